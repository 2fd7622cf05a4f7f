"""Read a GGUF file's header (metadata and tensor names) without loading any tensor data.

`gguf.GGUFReader` builds a numpy view for every metadata item (49k tokenizer strings for
SmolLM2) and takes seconds; the memory planner only needs the architecture numbers, so this
walks the header once with `struct` over a memory map. Layout (GGUF v2/v3, little-endian, from
the format's specification in ggml's docs/gguf.md): magic `GGUF`, uint32 version, uint64 tensor
count, uint64 metadata count; each metadata item is a string key, a uint32 value type and the
value (arrays: uint32 item type, uint64 count, items); then per tensor a string name, uint32
n_dims, n_dims uint64 dims, uint32 ggml type, uint64 offset. Strings are uint64 length + UTF-8.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

# value type -> struct format of one fixed-size item (8 = string, 9 = array)
_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
          11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFArray:
    """An array metadata value: its item type and length (items are skipped, not read)."""
    item_type: int
    count: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict            # key -> int | float | bool | str | GGUFArray
    tensors: dict             # tensor name -> shape (GGUF order: fastest dimension first)


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ValueError(f"{self.path}: GGUF header ends early (truncated file?)") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: GGUF header ends early (truncated file?)")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _FIXED:
            return self.take(_FIXED[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF metadata type {vtype} at byte {self.pos}")
        item_type, count = self.take("<I"), self.take("<Q")
        if item_type in _FIXED:
            self.pos += count * struct.calcsize(_FIXED[item_type])
        else:
            for _ in range(count):
                self.value(item_type)
        return GGUFArray(item_type, count)


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Metadata and tensor shapes of the GGUF file `path` (no tensor data is read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        cur = _Cursor(buf, path)
        cur.pos = 4
        version = cur.take("<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.take("<I"))
        tensors = {}
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
            cur.take("<I"), cur.take("<Q")          # ggml type, data offset
            tensors[name] = dims
    return GGUFHeader(version, metadata, tensors)


def gguf_llama_config(path: str | Path) -> dict:
    """The Llama config fields (HF names) that a llama-architecture GGUF file describes; the
    embeddings are tied when the file has no separate `output.weight` (as llama.cpp writes it)."""
    header = read_gguf_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF general.architecture is {arch!r}, not 'llama'")

    def need(key: str):
        if f"llama.{key}" not in meta:
            raise ValueError(f"{path}: GGUF metadata lacks llama.{key}")
        return meta[f"llama.{key}"]

    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get("llama.vocab_size", tokens.count if isinstance(tokens, GGUFArray) else None)
    if vocab is None:
        raise ValueError(f"{path}: GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens")
    heads = int(need("attention.head_count"))
    return {
        "model_type": "llama", "hidden_size": int(need("embedding_length")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-6)),
        "vocab_size": int(vocab), "tie_word_embeddings": "output.weight" not in header.tensors,
    }
