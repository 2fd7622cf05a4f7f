"""Prompt formats: how an eval item's instruction becomes the prompt a model is scored and
generates under.

`alpaca` (every model's default) is the Alpaca template the pipeline trains with
(pipeline.data.template.format_prompt), tokenised as in training: bos, then the prompt. `chat` is
the model's own chat template: one user message (the instruction, a blank line and the input when
there is one) rendered by `tokenizer.apply_chat_template(add_generation_prompt=True)` and
tokenised as that method tokenises it (no special tokens added: a template that wants a bos
writes it, SmolLM2's starts with `<|im_start|>`, its bos, so prepending one would double it).
Scored tokens are the same in both formats: the response, then eos.

A base that is an instruct model (SmolLM2-Instruct) is scored in both: `base` in the Alpaca
template, like every fine-tune, and `base_chat` in its own template (models.with_base_chat),
so a fine-tune's gain over the base can be read with and without the format handicap.
`h3fusion evaluate --models NAME=DIR@chat` asks for the chat format by hand. Which model dirs
have a chat template is models.py's business (models.chat_template_of, check_prompt_formats).
"""
from __future__ import annotations

from typing import Optional, Sequence

ALPACA, CHAT = "alpaca", "chat"
PROMPT_FORMATS = (ALPACA, CHAT)
BASE_CHAT = "base_chat"            # the base model in its own chat template


def check_prompt_format(fmt: str, where: str) -> None:
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"{where}: unknown prompt format {fmt!r} (known: {list(PROMPT_FORMATS)})")


def user_message(instruction: str, input_text: str = "") -> str:
    """The chat user turn of an item: the instruction, then a blank line and the input if any
    (as the saved generations write it)."""
    return instruction + (f"\n\n{input_text}" if input_text and input_text.strip() else "")


def render_prompts(tokenizer, items: Sequence[dict], fmt: str = ALPACA) -> list[str]:
    """Each item's prompt text in format `fmt`."""
    check_prompt_format(fmt, "render_prompts")
    if fmt == ALPACA:
        from pipeline.data.template import format_prompt   # imported late: data is a peer stage
        return [format_prompt(it["instruction"], it["input"]) for it in items]
    return [tokenizer.apply_chat_template([{"role": "user", "content": user_message(it["instruction"], it["input"])}],
                                          tokenize=False, add_generation_prompt=True)
            for it in items]


def adds_bos(fmt: str) -> bool:
    """Whether the prompt is encoded with bos first (Alpaca, as in training) or exactly as
    rendered (chat: the template writes its own special tokens)."""
    check_prompt_format(fmt, "prompt format")
    return fmt == ALPACA


def parse_prompt_format(path: str) -> tuple[str, Optional[str]]:
    """'DIR@chat' -> ('DIR', 'chat'); 'DIR' -> ('DIR', None). Only a known format after the
    last '@' counts, so a directory whose name holds '@' is left whole."""
    head, sep, tail = path.rpartition("@")
    if sep and head and tail in PROMPT_FORMATS:
        return head, tail
    return path, None
