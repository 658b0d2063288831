"""Tests for floranna_jax.convert_gguf (and gguf_tokenizer): GGUF file -> Hugging Face folder.

A tiny float32 GGUF written here with gguf.GGUFWriter, its Q and K rows permuted the way
llama.cpp's convert script does, must convert back to exactly the weights it was written
from. The real SmolLM2-135M-Instruct GGUF (4-bit) must convert to the weights, config and
tokenizer ids that transformers' own GGUF reading gives, except where transformers splits
digits unlike llama.cpp (several spaces before a digit). Skips, with the reason, without the
gguf package, the checkpoint or torch.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from floranna_jax import convert_gguf
from floranna_jax.errors import ConversionError

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (extra: convert)")

TINY = {"hidden": 16, "heads": 4, "kv_heads": 2, "ffn": 24, "layers": 2, "context": 64}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # CONTROL, ids 0..2 as in SmolLM2
USER_DEFINED = "<think>"  # id 3
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ Ġ", "ĠĠ ĠĠ", "Ġ =", "1 2", "Ġ 1", "i n", "Ġ in"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LAYER = {  # HF name -> llama.cpp name, written out here independently of the converter
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of bytes 0..255: the base vocabulary of byte-level BPE."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    spelled, extra = [], 256
    for b in range(256):
        spelled.append(chr(b) if b in printable else chr(extra))
        extra += b not in printable
    return spelled


def _tiny_vocab() -> tuple[list[str], list[int]]:
    tokens = [*SPECIALS, USER_DEFINED, *_byte_alphabet(), *(m.replace(" ", "") for m in MERGES)]
    types = [3] * len(SPECIALS) + [4] + [1] * (len(tokens) - len(SPECIALS) - 1)
    return tokens, types


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to the rows of Q and K."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tiny_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Hugging Face name -> float32 weight of a random tiny LLaMA."""
    rng = np.random.default_rng(seed)
    d, f, hd = TINY["hidden"], TINY["ffn"], TINY["hidden"] // TINY["heads"]
    q, kv, v = TINY["heads"] * hd, TINY["kv_heads"] * hd, len(_tiny_vocab()[0])
    shapes = {"model.embed_tokens": (v, d), "model.norm": (d,)} | (
        {} if tied else {"lm_head": (v, d)}
    )
    layer = [(d,), (q, d), (kv, d), (kv, d), (d, q), (d,), (f, d), (f, d), (d, f)]
    for i in range(TINY["layers"]):
        shapes |= {f"model.layers.{i}.{n}": s for n, s in zip(LAYER, layer, strict=True)}
    return {f"{n}.weight": rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}


def _gguf_name(hf: str) -> str:
    stem = hf.removesuffix(".weight")
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if stem in top:
        return f"{top[stem]}.weight"
    _, _, i, kind = stem.split(".", 3)
    return f"blk.{i}.{LAYER[kind]}.weight"


def write_tiny_gguf(
    path, tied=False, arch="llama", pre="smollm", model="gpt2", drop=(), add_bos=False
):
    """A float32 GGUF as llama.cpp writes a LLaMA; returns the weights it came from."""
    weights = _tiny_weights(tied)
    tokens, types = _tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(TINY["context"])
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, array in weights.items():
        if ".q_proj." in name or ".k_proj." in name:
            array = _llama_cpp_permute(array, TINY["heads" if ".q_proj." in name else "kv_heads"])
        if _gguf_name(name) not in drop:
            w.add_tensor(_gguf_name(name), array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, original weights, converted folder) of the untied tiny model."""
    root = tmp_path_factory.mktemp("tiny")
    weights = write_tiny_gguf(root / "model.gguf")
    convert_gguf.convert(root / "model.gguf", root / "hf", log=lambda line: None)
    return root / "model.gguf", weights, root / "hf"


def test_unpermute_inverts_llama_cpp_row_permutation():
    rng = np.random.default_rng(0)
    for n_head, head_dim, d in [(4, 8, 5), (3, 64, 2), (1, 2, 3)]:
        w = rng.normal(size=(n_head * head_dim, d))
        np.testing.assert_array_equal(
            convert_gguf.unpermute_rows(_llama_cpp_permute(w, n_head), n_head), w
        )
        assert not np.array_equal(_llama_cpp_permute(w, n_head), w) or head_dim == 2


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_round_trip_is_exact(tmp_path, tied):
    weights = write_tiny_gguf(tmp_path / "model.gguf", tied=tied)
    config = convert_gguf.convert(tmp_path / "model.gguf", tmp_path / "hf", log=lambda line: None)
    converted = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(converted) == sorted(weights)
    for name, w in weights.items():
        assert converted[name].dtype == np.float32
        np.testing.assert_array_equal(converted[name], w, err_msg=name)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written == config
    expect = {
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 4,
        "rope_theta": 5000.0,
        "max_position_embeddings": 64,
        "vocab_size": len(_tiny_vocab()[0]),
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    assert {k: written[k] for k in expect} == expect
    assert written["rms_norm_eps"] == pytest.approx(1e-5, rel=1e-6)  # stored as float32


@pytest.mark.slow
def test_tiny_matches_transformers_gguf_reading(tiny):
    """transformers un-permutes on its own: the test's permutation is llama.cpp's."""
    torch = pytest.importorskip("torch", reason="torch is not installed (reference only)")
    transformers = pytest.importorskip("transformers")
    path, weights, _ = tiny
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    for name, w in weights.items():
        np.testing.assert_array_equal(state[name], w, err_msg=name)


def test_tiny_tokenizer(tiny):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny[2] / "tokenizer.json"))
    pieces = tok.encode("x =    12").tokens
    assert pieces == ["x", "Ġ=", "ĠĠĠĠ", "1", "2"], pieces  # merges "1 2", "Ġ 1" never apply
    assert tok.encode("<|im_start|>the<think> in<|im_end|>").tokens == [
        "<|im_start|>", "t", "he", USER_DEFINED, "Ġin", "<|im_end|>"
    ]  # fmt: skip
    for text in ["x =    12", "héllo\n\n  wörld 🤗 12.5", "<|im_start|>a<think>b"]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert tok.decode(tok.encode("a<|im_end|>b").ids) == "ab"  # special, skipped
    assert tok.decode(tok.encode("a<think>b").ids) == "a<think>b"  # user-defined: text
    assert tok.get_vocab_size() == len(_tiny_vocab()[0])


def test_tiny_folder_loads_in_transformers_without_gguf(tiny):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tiny[2])
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        SPECIALS[0],
    )
    assert tok("x =    12")["input_ids"] == tok.convert_tokens_to_ids(["x", "Ġ=", "ĠĠĠĠ", "1", "2"])
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    config = transformers.AutoConfig.from_pretrained(tiny[2])
    assert config.rope_parameters["rope_theta"] == 5000.0 and config.num_key_value_heads == 2


def test_add_bos_token_is_kept(tmp_path):
    from tokenizers import Tokenizer

    write_tiny_gguf(tmp_path / "model.gguf", add_bos=True)
    convert_gguf.convert(tmp_path / "model.gguf", tmp_path / "hf", log=lambda line: None)
    tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert tok.encode("the").tokens == ["<|im_start|>", "t", "he"]
    assert tok.encode("the", add_special_tokens=False).tokens == ["t", "he"]
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["bos_token"] == "<|im_start|>"


def test_gpt2_pre_tokenizer_keeps_digit_runs():
    from floranna_jax.gguf_tokenizer import PRE_TOKENIZERS, _split

    def pieces(pre, text):
        return [p for p, _ in _split(PRE_TOKENIZERS[pre][0]).pre_tokenize_str(text)]

    assert pieces("gpt-2", "x =    123") == ["x", "Ġ=", "ĠĠĠ", "Ġ123"]
    assert pieces("smollm", "x =    123") == ["x", "Ġ=", "ĠĠĠĠ", "1", "2", "3"]
    assert pieces("smollm", "a\n  b\n") == ["a", "ĊĠ", "Ġb", "Ċ"]  # last space joins the word


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"arch": "qwen2"}, "architecture 'qwen2' is not supported"),
        ({"pre": "llama-bpe"}, "tokenizer.ggml.pre 'llama-bpe' is not supported"),
        ({"model": "llama"}, "tokenizer.ggml.model 'llama' is not supported"),
        ({"drop": ("blk.1.ffn_up.weight",)}, "missing tensors: blk.1.ffn_up.weight"),
    ],
)
def test_unsupported_files_are_one_error_and_write_nothing(tmp_path, kwargs, message):
    write_tiny_gguf(tmp_path / "model.gguf", **kwargs)
    with pytest.raises(ConversionError, match=re.escape(message)) as e:
        convert_gguf.convert(tmp_path / "model.gguf", tmp_path / "hf")
    assert str(e.value).startswith(str(tmp_path / "model.gguf")) and "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(ConversionError, match="no such file"):
        convert_gguf.convert(tmp_path / "absent.gguf", tmp_path / "hf")
    (tmp_path / "text.gguf").write_text("hello, not a model")
    with pytest.raises(ConversionError, match="not a GGUF file"):
        convert_gguf.convert(tmp_path / "text.gguf", tmp_path / "hf")
    write_tiny_gguf(tmp_path / "model.gguf")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "model.gguf").read_bytes()[:200])
    with pytest.raises(ConversionError, match="unreadable GGUF, truncated or corrupt"):
        convert_gguf.convert(tmp_path / "cut.gguf", tmp_path / "hf")
    whole = (tmp_path / "model.gguf").read_bytes()  # cut in the tensor data: also named
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) - 100])
    with pytest.raises(ConversionError, match="truncated"):
        convert_gguf.convert(tmp_path / "cut.gguf", tmp_path / "hf")
    with pytest.raises(ConversionError, match="is not a folder"):
        convert_gguf.convert(tmp_path / "model.gguf", tmp_path / "text.gguf")
    assert not (tmp_path / "hf").exists()

    def unsupported(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    with monkeypatch.context() as m:  # a storage type this gguf version cannot read
        m.setattr(gguf.quants, "dequantize", unsupported)
        with pytest.raises(ConversionError, match="cannot dequantize type F32 with gguf"):
            convert_gguf.convert(tmp_path / "model.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(ConversionError, match=r"pip install 'floranna_jax\[convert\]'"):
        convert_gguf.convert(tmp_path / "model.gguf", tmp_path / "hf")


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "floranna_jax.convert_gguf", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli(tmp_path):
    write_tiny_gguf(tmp_path / "model.gguf")
    done = _cli(tmp_path / "model.gguf", tmp_path / "out" / "hf")
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == [
        "read", "tokenizer:", "weights:", "done:"
    ]  # fmt: skip
    written = sorted(p.name for p in (tmp_path / "out" / "hf").iterdir())
    assert written == [
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "model.gguf").read_bytes()[:200])
    for args, says in [
        ((tmp_path / "cut.gguf", tmp_path / "x"), "cut.gguf: unreadable GGUF, truncated"),
        ((tmp_path / "absent.gguf", tmp_path / "x"), "absent.gguf: no such file"),
        ((tmp_path / "notes.txt", tmp_path / "x"), "notes.txt: not a GGUF file"),
        ((tmp_path / "model.gguf",), "expected SRC.gguf and DEST_FOLDER"),
    ]:
        failed = _cli(*args)
        assert failed.returncode == 2, failed
        assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("error: ")
        assert says in failed.stderr
    assert not (tmp_path / "x").exists()


# ---- the real SmolLM2-135M-Instruct GGUF against transformers' own GGUF reading ----

# transformers' GGUF tokenizer splits GPT-2 style only (no digit isolation): a run of 2+
# whitespace characters before a digit loses its last space to the digit's piece.
KNOWN_DIGIT_CASE = re.compile(r"\s{2,}\d")
TEXTS = [
    "Hello world! 123",
    "  multiple   spaces",
    "The capital of France is Paris. In 2024 it had 2,100,000 people (12.5% more).",
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n\tpass\n",
    "for i in range(10):\n        print(f'{i:>3}', i ** 2)  # comment\n",
    "Café déjà vu. Ünïcödé: 日本語のテキスト, Русский текст, عربى, emoji 🤗👍🏽",
    "It's we're they'll I'd DON'T   \n\n\t\ttabs\tand\r\nCRLF  ",
    "<|im_start|>user\nHi<|im_end|> <file_sep> <jupyter_code>",
    "x =    123",
    "total:\n    42 apples\n  7 pears",
]
MESSAGES = [
    {"role": "user", "content": "What is 7 * 8?"},
    {"role": "assistant", "content": "7 * 8 =    56."},
]


@pytest.fixture(scope="module")
def smollm(smollm_gguf, tmp_path_factory):
    """SmolLM2 converted once: (folder, seconds the conversion took)."""
    import time

    dest = tmp_path_factory.mktemp("smollm2")
    start = time.perf_counter()
    convert_gguf.convert(smollm_gguf, dest, log=lambda line: None)
    return dest, time.perf_counter() - start


@pytest.fixture(scope="module")
def gguf_folder(smollm_gguf, tmp_path_factory):
    """A folder holding only the GGUF, for transformers' ``gguf_file=`` loading."""
    folder = tmp_path_factory.mktemp("smollm_gguf")
    (folder / "model.gguf").symlink_to(smollm_gguf)
    return folder


@pytest.mark.slow
def test_smollm_weights_and_config_equal_transformers(smollm, gguf_folder):
    torch = pytest.importorskip("torch", reason="torch is not installed (reference only)")
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_folder, gguf_file="model.gguf", dtype=torch.float32
    )
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    converted = load_file(smollm[0] / "model.safetensors")
    assert sorted(converted) == sorted(set(state) - {"lm_head.weight"})  # tied: not written
    worst = max(float(np.abs(converted[k] - state[k]).max()) for k in converted)
    # both dequantize the same 4-bit blocks in float32 (gguf's numpy vs transformers' own)
    assert worst <= 1e-6, worst
    ours = transformers.AutoConfig.from_pretrained(smollm[0])
    fields = [
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "rope_parameters", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id",
    ]  # fmt: skip
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(ref.config, f) for f in fields}


@pytest.mark.slow
def test_smollm_tokenizer_matches_transformers_but_for_digits(smollm, gguf_folder):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    ref = transformers.AutoTokenizer.from_pretrained(gguf_folder, gguf_file="model.gguf")
    ours = transformers.AutoTokenizer.from_pretrained(smollm[0])
    raw = Tokenizer.from_file(str(smollm[0] / "tokenizer.json"))
    chat = ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat == ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    differ = []
    for text in [*TEXTS, chat]:
        ids = ours(text)["input_ids"]
        assert raw.encode(text).ids == ids
        assert ours.decode(ids) == text
        if ids != ref(text)["input_ids"]:
            differ.append(text)
    assert differ == [t for t in [*TEXTS, chat] if KNOWN_DIGIT_CASE.search(t)] != []
    # llama.cpp's split: each digit its own token, however many spaces come before it
    assert ours.convert_ids_to_tokens(ours("x =    123")["input_ids"]) == [
        "x", "Ġ=", "ĠĠĠĠ", "1", "2", "3"
    ]  # fmt: skip
    assert ours("Hello world! 123")["input_ids"] == [19556, 905, 17, 216, 33, 34, 35]
    assert ours("  multiple   spaces")["input_ids"] == [216, 2701, 256, 5600]
    assert ours("<|im_start|>user\nHi<|im_end|>")["input_ids"] == [1, 4093, 198, 26843, 2]
