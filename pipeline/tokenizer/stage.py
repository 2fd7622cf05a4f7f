"""The tokenizer stage (`h3fusion tokenizer`): train a sentencepiece BPE tokenizer on the corpus
(or copy a user's -- `tokenizer.path`, a local dir or `hf:ORG/NAME[@REVISION]` from the Hugging Face
cache, fetched once: pipeline.checkpoint.hub, docs/hub.md -- or take a GGUF base's: with `base.gguf` the
tokenizer is the GGUF file's own, the same one the base stage saves beside the converted model;
docs/smollm2.md).

The trained model is exported as a Hugging Face `LlamaTokenizer` directory (tokenizer.json:
BPE with byte fallback, Metaspace pre-tokenizer) so `AutoTokenizer.from_pretrained(dir)` works
without protobuf; the raw `sentencepiece.model` is kept beside it for reference.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Iterator

from ..config import TokenizerConfig
from ..io_utils import atomic_dir, check_output_dir, write_json, MANIFEST
from ..layout import RunLayout
from ..checkpoint.tokenizer_check import ROUND_TRIP_PROBE

SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def corpus_texts(data_dir: Path) -> Iterator[str]:
    """Pretrain text plus every SFT train prompt+response (the same strings the models see)."""
    from ..data.loading import data_dimensions, load_pretrain, load_sft
    from ..data.template import format_prompt
    yield from load_pretrain(data_dir)["text"]
    for task in data_dimensions(data_dir):
        for row in load_sft(data_dir, task, "train"):
            yield format_prompt(row["instruction"], row["input"]) + row["response"]


def train_sentencepiece(texts: Iterator[str], vocab_size: int, prefix: Path) -> Path:
    """BPE, byte fallback, digits split, no normalisation (keeps newlines and case)."""
    import sentencepiece as spm
    if vocab_size < 300:
        raise ValueError(f"tokenizer.vocab_size must be >= 300 (256 byte pieces + specials), got {vocab_size}")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(t for t in texts if t.strip()), model_prefix=str(prefix),
            vocab_size=vocab_size, model_type="bpe", byte_fallback=True, split_digits=True,
            character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
            hard_vocab_limit=False, num_threads=1, minloglevel=2, max_sentence_length=16384)
    except RuntimeError as exc:
        # e.g. fewer pieces than the corpus has characters: sentencepiece's own check, raised
        # as a bare RuntimeError; say which key to change
        raise ValueError(f"tokenizer.vocab_size={vocab_size}: sentencepiece cannot train on this "
                         f"corpus ({str(exc).strip().splitlines()[-1]}); raise tokenizer.vocab_size") from None
    return prefix.with_suffix(".model")


def hf_tokenizer_from_spm(model_file: Path):
    """A transformers `LlamaTokenizer` with the sentencepiece model's vocab and merges."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab)
    return LlamaTokenizer(vocab=vocab, merges=merges, add_prefix_space=True, **SPECIALS)


def check_tokenizer(tok) -> None:
    """bos/eos/pad/unk set and decode(encode(x)) == x on a probe with newlines and non-ASCII."""
    for name in SPECIALS:
        if getattr(tok, f"{name}_id", None) is None:
            raise ValueError(f"tokenizer lacks {name}")
    ids = tok.encode(ROUND_TRIP_PROBE, add_special_tokens=False)
    back = tok.decode(ids, skip_special_tokens=True)
    if back != ROUND_TRIP_PROBE:
        raise ValueError(f"tokenizer round trip failed: {ROUND_TRIP_PROBE!r} -> {back!r}")


def user_tokenizer_dir(value: str) -> tuple[Path, dict]:
    """`tokenizer.path` -> (local dir, manifest source); a hub id resolves to its cached snapshot
    (tokenizer files only). Runs before the output dir is created."""
    from ..checkpoint.hub import local_model_dir
    path, snapshot = local_model_dir(value, "tokenizer.path", weights=False)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer.path does not exist: {path}")
    source = {"kind": "copied", "path": str(value)}
    if snapshot is not None:
        source.update(path=str(path), hub=snapshot.provenance())
    return path, source


def copy_user_tokenizer(path: str | Path, out: Path):
    from transformers import AutoTokenizer
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer.path does not exist: {path}")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:  # Llama tokenizers often ship without one; eos is the usual stand-in
        tok.pad_token = tok.eos_token
    tok.save_pretrained(str(out))
    return tok


def run_tokenizer_stage(cfg: TokenizerConfig, run_dir: str | Path, overwrite: bool = False,
                        gguf: str | None = None) -> dict:
    """`gguf` (the config's `base.gguf`): use that GGUF file's tokenizer instead of training one."""
    layout = RunLayout.at(run_dir)
    t0 = time.time()
    gguf_path = user = None
    if gguf:
        from ..checkpoint.gguf import resolve_gguf
        gguf_path = resolve_gguf(gguf)    # a missing file/package fails before any output
    elif cfg.path:
        check_output_dir(layout.tokenizer, overwrite)   # refused before any download
        user = user_tokenizer_dir(cfg.path)             # likewise a missing dir or hub id
    with atomic_dir(layout.tokenizer, overwrite=overwrite) as tmp:
        if gguf_path is not None:
            from ..checkpoint.gguf import fast_gguf_loading, gguf_tokenizer
            from ..io_utils import sha256_file
            with fast_gguf_loading():
                tok = gguf_tokenizer(gguf_path)
            tok.save_pretrained(str(tmp))
            source = {"kind": "gguf", "gguf_spec": gguf, "gguf": str(gguf_path.resolve()),
                      "gguf_sha256": sha256_file(gguf_path)}
        elif user is not None:
            tok = copy_user_tokenizer(user[0], tmp)
            source = user[1]
        else:
            model_file = train_sentencepiece(corpus_texts(layout.data), cfg.vocab_size, tmp / "sentencepiece")
            tok = hf_tokenizer_from_spm(model_file)
            check_tokenizer(tok)
            tok.save_pretrained(str(tmp))
            shutil.move(str(tmp / "sentencepiece.vocab"), str(tmp / "sentencepiece.vocab.txt"))
            source = {"kind": "sentencepiece-bpe", "data_dir": str(layout.data), "vocab_size": cfg.vocab_size}
        manifest = {"stage": "tokenizer", "source": source, "vocab_size": len(tok),
                    "special_tokens": {k: getattr(tok, k) for k in SPECIALS},
                    "special_token_ids": {k: getattr(tok, f"{k}_id") for k in SPECIALS},
                    "wall_s": round(time.time() - t0, 3)}
        write_json(tmp / MANIFEST, manifest)
    return manifest
