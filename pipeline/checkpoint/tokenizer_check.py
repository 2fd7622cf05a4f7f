"""Tokenizer agreement across the models being fused or merged (same ids for the same text)."""
from __future__ import annotations

from pathlib import Path

from .safetensors_io import TOKENIZER_FILES

# decode(encode(x)) must give x back: newlines, the response marker, digits and non-ASCII
ROUND_TRIP_PROBE = "### Response:\nThe answer is 42.\n\nNo, that's a myth! ünïcödé 😀"


def has_tokenizer(model_dir: str | Path) -> bool:
    return any((Path(model_dir) / n).is_file() for n in TOKENIZER_FILES[:2])


def tokenizer_fingerprint(model_dir: str | Path) -> dict:
    """What must agree: the vocabulary (token -> id) and the special-token ids."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    return {"vocab": tok.get_vocab(), "bos": tok.bos_token_id, "eos": tok.eos_token_id,
            "pad": tok.pad_token_id, "unk": tok.unk_token_id}


def check_same_tokenizer(reference_dir: str | Path, others: list[Path], vocab_size: int) -> None:
    """Raise ValueError naming the first dir whose tokenizer disagrees with the reference."""
    ref = tokenizer_fingerprint(reference_dir)
    if len(ref["vocab"]) > vocab_size:
        raise ValueError(f"{reference_dir}: tokenizer has {len(ref['vocab'])} tokens but the "
                         f"model's vocab_size is {vocab_size}")
    for other in others:
        if Path(other).resolve() == Path(reference_dir).resolve():
            continue
        fp = tokenizer_fingerprint(other)
        if fp["vocab"] != ref["vocab"]:
            diff = len(set(fp["vocab"].items()) ^ set(ref["vocab"].items()))
            raise ValueError(f"{other}: tokenizer vocabulary differs from {reference_dir} "
                             f"({diff} token/id pairs differ)")
        for key in ("bos", "eos", "pad", "unk"):
            if fp[key] != ref[key]:
                raise ValueError(f"{other}: tokenizer {key}_token_id={fp[key]} differs from "
                                 f"{reference_dir} ({ref[key]})")
