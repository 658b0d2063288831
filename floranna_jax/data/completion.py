"""Prompt -> completion examples for decoders: tokenizers, prompt formats, fixed-shape arrays.

    codec = completion.byte_codec()                      # or hf_codec(AutoTokenizer...)
    prompt = completion.prompt_ids(codec, "What is 3 + 4?", fmt="plain")
    target = completion.target_ids(codec, "3 + 4 = 7\\n#### 7")   # ends in eos
    arrays = completion.arrays([prompt], [target], max_length=64)
    ids, mask = completion.left_pad([prompt], length=32, pad_id=codec.pad_id)
    completion.cut_at("7\n#### 7\n\nQuestion: what", ("Question:",))   # "7\n#### 7\n\n"

A :class:`Codec` hides which tokenizer a run uses: a Hugging Face tokenizer of the model
folder (:func:`hf_codec`), or the built-in byte-level one (:func:`byte_codec`: ids 0-255 are
the UTF-8 bytes, then pad, bos, eos; 259 ids, so the tiny random LLaMA's 512 fit).

Prompt formats (:data:`FORMATS`): ``"chat"`` renders the user message with the tokenizer's
chat template and its generation prompt; ``"plain"`` is the text itself, after the
tokenizer's bos when it adds one; ``"auto"`` is chat when the tokenizer has a template.
Prompt and target are tokenized separately, so the boundary is exact: the target's tokens
(and the eos after them) are the completion whatever the tokenizer merges.

Training rows (:func:`arrays`): ``input_ids``, ``attention_mask``, ``loss_mask`` int32
``[N, L]``, right-padded; ``loss_mask`` is 1 exactly on the target tokens and the eos.
Truncation: a row longer than ``max_length`` keeps its first ``max_length`` tokens (the
prompt whole when it fits, the target cut at its end, losing its eos); a prompt that fills
the row alone leaves no loss token (the loss counts tokens, so the row adds nothing).
``L`` is the longest row after truncation, rounded up to 16 tokens.

Stop strings end a generation (:func:`stop_sequences`, the token sequences the decoder
stops at; :func:`cut_at`, the text a scorer sees: everything before the first stop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

FORMATS = ("auto", "chat", "plain")
BYTE_PAD, BYTE_BOS, BYTE_EOS = 256, 257, 258
ROW_MULTIPLE = 16


class Codec(NamedTuple):
    """A tokenizer as the task uses it. ``encode(text) -> ids`` adds no special tokens;
    ``decode(ids) -> text`` skips special ones; ``prefix``: the ids a plain prompt starts with
    (the bos, when the tokenizer adds one); ``chat(user_text) -> text``: the chat template
    applied to one user message with the generation prompt, None without a template."""

    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    eos_id: int
    pad_id: int
    prefix: tuple[int, ...]
    chat: Callable[[str], str] | None
    vocab_size: int


def byte_codec() -> Codec:
    """UTF-8 bytes plus pad (256), bos (257) and eos (258); no chat template."""

    def decode(ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    return Codec(lambda text: list(text.encode("utf-8")), decode, BYTE_EOS, BYTE_PAD,
                 (BYTE_BOS,), None, 259)  # fmt: skip


def hf_codec(tokenizer: Any) -> Codec:
    """A Hugging Face tokenizer (transformers ``PreTrainedTokenizer``) as a :class:`Codec`."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; a completion must end in one")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with_specials = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    prefix = (bos,) if bos is not None and with_specials[:1] == [bos] else ()
    chat = None
    if getattr(tokenizer, "chat_template", None):

        def chat(user_text: str) -> str:
            messages = [{"role": "user", "content": user_text}]
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip

    return Codec(
        lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"]),
        lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
        int(tokenizer.eos_token_id), int(pad), prefix, chat, len(tokenizer),
    )  # fmt: skip


def resolve_format(codec: Codec, fmt: str) -> str:
    """``"chat"`` or ``"plain"``; raises ``ValueError`` for an unknown format or for chat
    without a template."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "auto":
        return "chat" if codec.chat is not None else "plain"
    if fmt == "chat" and codec.chat is None:
        raise ValueError("'chat' needs a tokenizer with a chat template; this one has none "
                         "(use 'plain' or 'auto')")  # fmt: skip
    return fmt


def prompt_ids(codec: Codec, user_text: str, fmt: str) -> list[int]:
    """The prompt's ids: the chat template around ``user_text`` (``fmt="chat"``), or
    ``prefix + user_text`` (``"plain"``). ``fmt`` as :func:`resolve_format` returns it."""
    if fmt == "chat":
        return codec.encode(codec.chat(user_text))
    return [*codec.prefix, *codec.encode(user_text)]


def target_ids(codec: Codec, target: str) -> list[int]:
    """The completion's ids: the target text, then eos."""
    return [*codec.encode(target), codec.eos_id]


def row_length(lengths: Sequence[int], max_length: int) -> int:
    """``L``: the longest of ``lengths`` rounded up to 16, at most ``max_length``."""
    longest = max([1, *lengths])
    return min(max_length, -(-longest // ROW_MULTIPLE) * ROW_MULTIPLE)


def arrays(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *,
           max_length: int, length: int | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Training rows ``{"input_ids", "attention_mask", "loss_mask"}`` int32 ``[N, L]``
    (``L = length``, or :func:`row_length` of the rows); truncated as the module says."""
    rows = [[*p, *t][:max_length] for p, t in zip(prompts, targets, strict=True)]
    L = length or row_length([len(r) for r in rows], max_length)
    out = {k: np.zeros((len(rows), L), np.int32) for k in ("input_ids", "attention_mask",
                                                              "loss_mask")}  # fmt: skip
    for i, (row, p) in enumerate(zip(rows, prompts, strict=True)):
        row = row[:L]
        out["input_ids"][i, : len(row)] = row
        out["attention_mask"][i, : len(row)] = 1
        out["loss_mask"][i, len(p) : len(row)] = 1
    return out


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
    """``(ids, mask)`` int32 ``[N, length]``: prompts LEFT-padded for generation; a longer
    prompt keeps its last ``length`` tokens (the end holds the cue to answer)."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        p = list(p)[-length:]
        if p:
            ids[i, length - len(p) :] = p
            mask[i, length - len(p) :] = 1
    return ids, mask


def until_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    """The generated ids before the first eos."""
    ids = [int(i) for i in ids]
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


# Text a stop string may follow mid-generation. A tokenizer spells a word differently
# after a space (BPE folds the space into the word's token) or at a line start.
_STOP_CONTEXTS = ("", " ", "\n")


def stop_sequences(codec: Codec, stops: Sequence[str]) -> list[list[int]]:
    """The token sequences whose emission ends a generation at one of ``stops``: each
    string as ``codec`` encodes it alone, after a space and after a newline (without the
    context's own tokens when they stay separate), duplicates dropped. Every sequence
    decodes to text ending in its stop string, so it never ends a generation early; a
    spelling missed here only costs decoding time (:func:`cut_at` still cuts the text)."""
    out: list[list[int]] = []
    for stop in stops:
        for context in _STOP_CONTEXTS:
            ids, lead = codec.encode(context + stop), codec.encode(context)
            ids = ids[len(lead) :] if ids[: len(lead)] == lead else ids
            if ids and ids not in out:
                out.append(ids)
    return out


def cut_at(text: str, stops: Sequence[str]) -> str:
    """``text`` before the earliest occurrence of any of ``stops`` (all of it if none)."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text
