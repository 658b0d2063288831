r"""A GGUF file's tokenizer as Hugging Face files: ``tokenizer.json`` (built with ``tokenizers``),
``tokenizer_config.json`` and ``special_tokens_map.json``. Used by ``convert_gguf``.

A GGUF stores its tokenizer as metadata: ``tokenizer.ggml.tokens`` (ids are positions),
``merges`` (``"a b"``, best first), ``token_type`` (llama.cpp's ``gguf.TokenType``), the
special token ids, ``add_bos_token``/``add_eos_token`` and ``chat_template``. How llama.cpp
splits text before BPE is not stored, only named by ``tokenizer.ggml.pre``; the regexes per
name come from llama.cpp's ``llama-vocab.cpp`` and are applied one after the other, each on
the pieces of the previous one, exactly as a ``pre_tokenizers.Sequence`` of ``Split``s does.
An unknown name is an error, never a guess: a wrong split gives plausible but wrong ids.
"""

from __future__ import annotations

import collections

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from floranna_jax.errors import ConversionError, first_line

# GPT-2's split as llama.cpp writes it. It lacks the usual trailing "|\s+": text that no
# alternative matches stays a piece of its own there, as it does in a `Split(..., "isolated")`.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

# tokenizer.ggml.pre -> (llama.cpp's regexes in the order it applies them, whether its
# detokenizer cleans spaces before punctuation). One row of llama.cpp's table supports a name.
PRE_TOKENIZERS = {
    "smollm": ((r"\p{N}", _GPT2_SPLIT), False),  # every digit its own piece, then GPT-2
    "gpt-2": ((_GPT2_SPLIT,), True),
}

# llama.cpp's token types: CONTROL tokens are special; USER_DEFINED ones are matched whole in
# the text like special ones, but decode as text.
_CONTROL, _USER_DEFINED = 3, 4
_SPECIAL_IDS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}


def _split(regexes: tuple[str, ...]) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's regex splits, then the byte-level alphabet (without GPT-2's own split)."""
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=False, trim_offsets=True, use_regex=False
    )
    return pre_tokenizers.Sequence([*splits, byte_level])


def _post_processor(specials: dict[str, tuple[str, int]], add_bos: bool, add_eos: bool):
    """Byte-level offsets, plus BOS/EOS around every sequence when the file asks for them."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    ends = [specials[k] for k, add in (("bos", add_bos), ("eos", add_eos)) if add]
    if not ends:
        return byte_level
    missing = [k for k, add in (("bos", add_bos), ("eos", add_eos)) if add and k not in specials]
    if missing:
        raise ConversionError(f"add_{missing[0]}_token is set but there is no {missing[0]} id")
    bos = [specials["bos"][0]] if add_bos else []
    eos = [specials["eos"][0]] if add_eos else []
    single = [*bos, "$A", *eos]
    pair = [*single, *bos, "$B:1", *eos]
    template = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=ends
    )
    return processors.Sequence([byte_level, template])


def _bpe(tokens: list[str], merges: list[str]) -> models.BPE:
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        dupes = [t for t, n in collections.Counter(tokens).items() if n > 1]
        raise ConversionError(f"tokenizer.ggml.tokens repeats {dupes[:3]}; ids would be ambiguous")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = [m for m, p in zip(merges, pairs, strict=True) if len(p) != 2]
    if bad:
        raise ConversionError(f"tokenizer.ggml.merges has entries that are not 'a b': {bad[:3]}")
    try:
        return models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
    except Exception as e:  # a merge of tokens not in the vocabulary
        raise ConversionError(f"tokenizer.ggml.merges: {first_line(e)}") from None


def build_tokenizer(meta, config: dict) -> tuple[Tokenizer, dict, dict]:
    """``(tokenizer.json's Tokenizer, tokenizer_config.json, special_tokens_map.json)`` from the
    metadata ``meta(key, default)`` of a GGUF whose model config is ``config``."""
    kind = meta("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(f"tokenizer.ggml.model {kind!r} is not supported; only 'gpt2' (BPE)")
    pre = meta("tokenizer.ggml.pre", None)
    if pre not in PRE_TOKENIZERS:
        raise ConversionError(
            f"tokenizer.ggml.pre {pre!r} is not supported (supported: {sorted(PRE_TOKENIZERS)});"
            " add llama.cpp's regexes for it to gguf_tokenizer.PRE_TOKENIZERS"
        )
    regexes, clean_spaces = PRE_TOKENIZERS[pre]
    tokens = meta("tokenizer.ggml.tokens")
    types = meta("tokenizer.ggml.token_type", None) or [1] * len(tokens)
    if len(tokens) != config["vocab_size"] or len(types) != len(tokens):
        raise ConversionError(
            f"{len(tokens)} tokens and {len(types)} token types for a vocabulary of "
            f"{config['vocab_size']}"
        )
    specials = {}
    for name, key in _SPECIAL_IDS.items():
        token_id = meta(f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None:
            if not 0 <= token_id < len(tokens):
                raise ConversionError(f"tokenizer.ggml.{key}_token_id {token_id} is out of range")
            specials[name] = (tokens[token_id], token_id)
    add_bos = bool(meta("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta("tokenizer.ggml.add_eos_token", False))

    tokenizer = Tokenizer(_bpe(tokens, meta("tokenizer.ggml.merges")))
    tokenizer.pre_tokenizer = _split(regexes)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(specials, add_bos, add_eos)
    # the file's CONTROL tokens, and bos/eos/unk/pad whatever type the file gives them
    special_ids = {i for i, t in enumerate(types) if t == _CONTROL}
    special_ids |= {i for _, i in specials.values()}
    tokenizer.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special_ids)]
    )
    tokenizer.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == _USER_DEFINED and i not in special_ids
        ]
    )
    if tokenizer.get_vocab_size() != len(tokens):  # an added token took a new id
        raise ConversionError("special tokens do not match the vocabulary")

    named = {f"{name}_token": token for name, (token, _) in specials.items()}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": clean_spaces,
        "model_max_length": config["max_position_embeddings"],
    }
    template = meta("tokenizer.chat_template", None)
    if template is not None:
        tokenizer_config["chat_template"] = template
    return tokenizer, tokenizer_config, named
