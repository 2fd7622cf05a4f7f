"""Streaming safetensors I/O for Hugging Face model dirs (single file or sharded with an index).

`CheckpointReader` validates every shard's header up front (missing shard, corrupt header,
truncated data) and then hands out one tensor at a time, memory-mapped, so surgery on a 7B model
holds roughly one layer's tensors at once. `ShardedWriter` buffers tensors up to a shard size,
writes shards as it goes, and writes `model.safetensors.index.json` when there is more than one.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from ..io_utils import read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3
_HEADER_LIMIT = 100 * 1024 ** 2       # safetensors itself refuses headers above 100 MB


def read_config_json(model_dir: str | Path) -> dict:
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    return read_json(Path(model_dir) / "config.json")


def read_safetensors_header(path: Path) -> dict:
    """Parse and check one file's header; raise ValueError if it is corrupt or truncated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _HEADER_LIMIT or 8 + header_len > size:
            raise ValueError(f"{path}: corrupt or truncated safetensors header "
                             f"(header length {header_len}, file {size} bytes)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_len = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + header_len + data_len != size:
        raise ValueError(f"{path}: truncated or corrupt safetensors file: header promises "
                         f"{8 + header_len + data_len} bytes, file has {size}")
    return header


class CheckpointReader:
    """Tensor-by-tensor access to the safetensors weights of one HF model dir."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"model directory not found: {self.dir}")
        self.weight_map = self._weight_map()
        self.headers = {shard: read_safetensors_header(self.dir / shard)
                        for shard in sorted(set(self.weight_map.values()))}
        for key, shard in self.weight_map.items():
            if key not in self.headers[shard]:
                raise ValueError(f"{self.dir / INDEX_FILE}: tensor {key} is mapped to {shard}, "
                                 f"which does not contain it")
        self._handles: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{index}: not a valid safetensors index ({exc})") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.dir / shard).is_file():
                    raise FileNotFoundError(f"{index}: shard {shard} is missing from {self.dir}")
            return dict(weight_map)
        single = self.dir / SINGLE_FILE
        if not single.is_file():
            raise FileNotFoundError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} "
                                    f"(only safetensors checkpoints are supported)")
        return {key: SINGLE_FILE for key in read_safetensors_header(single)}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(self.headers[s][k]["shape"]) for k, s in self.weight_map.items()}

    def dtype_name(self, key: str) -> str:
        return self.headers[self.weight_map[key]][key]["dtype"]

    def files(self) -> list[Path]:
        """The weight files (and index) of this checkpoint."""
        out = [self.dir / s for s in sorted(set(self.weight_map.values()))]
        return out + ([self.dir / INDEX_FILE] if (self.dir / INDEX_FILE).is_file() else [])

    def get(self, key: str) -> torch.Tensor:
        if key not in self.weight_map:
            raise KeyError(f"{self.dir}: no tensor named {key}")
        shard = self.weight_map[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._handles[shard].get_tensor(key)

    def get_finite(self, key: str) -> torch.Tensor:
        """`get`, refusing a floating tensor with NaN/inf (named with its file): fusing or
        merging a diverged model would otherwise write a model full of NaN without a word."""
        tensor = self.get(key)
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ValueError(f"{self.dir / self.weight_map[key]}: tensor {key} has {bad} "
                                 f"non-finite values (NaN/inf) of {tensor.numel()}; refusing "
                                 f"to use a diverged model")
        return tensor

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_shard_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One shard to disk (a separate function so tests can make it fail like a full disk)."""
    save_file(tensors, str(path), metadata={"format": "pt"})


class ShardedWriter:
    """Write tensors in the order given into shards of at most `max_shard_bytes` each."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._seen:
            raise ValueError(f"ShardedWriter: tensor {key} written twice")
        self._seen.add(key)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().nbytes() != nbytes:
            # a slice of a bigger tensor: copy it so the pending shard does not pin (and
            # safetensors does not see) the whole parent storage
            tensor = tensor.clone()
        self._pending[key] = tensor
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def add_all(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        for key, tensor in items:
            self.add(key, tensor)

    def _flush(self) -> None:
        path = self.dir / f"shard-{len(self._shards):05d}.partial"
        _write_shard_file(self._pending, path)
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Flush, give shards their final HF names, write the index; return the weight map."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (path, keys) in enumerate(self._shards):
            name = SINGLE_FILE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path.rename(self.dir / name)
            weight_map.update({k: name for k in keys})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return weight_map


def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy the tokenizer files present in `src_dir`; raise if there are none."""
    src = Path(src_dir)
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise FileNotFoundError(f"{src}: no tokenizer (tokenizer.json or tokenizer.model)")
    for name in copied:
        shutil.copy2(src / name, Path(dst_dir) / name)
    return copied


def copy_optional_files(src_dir: str | Path, dst_dir: str | Path, names: Iterable[str]) -> None:
    for name in names:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, Path(dst_dir) / name)
