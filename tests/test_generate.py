"""The generate command: a run's model and its merged export write the same greedy text;
nucleus sampling of a tiny top-p is greedy; bad inputs are one line, exit 2."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from decoder_cases import left_padded_prompts, tiny_model
from export_cases import REPO_ROOT, trained
from smoke_setup import shared_compilation, smoke_config

from floranna_jax import export, generate, train
from floranna_jax.data import completion
from floranna_jax.errors import ConfigError
from floranna_jax.models import decoder

PROMPTS = ["What is 12 + 7?", "What is 3 + 4?"]


def test_merged_export_generates_what_the_run_generates(tmp_path):
    """Same tokenizer (copied), same plain prompt format, same weights up to the merge."""
    workdir = trained("fedsa")
    export.export(workdir, str(tmp_path), merged=True, client=2)
    run = generate.complete(generate.from_workdir(workdir, client=2), PROMPTS, max_new_tokens=8)
    folder = generate.from_model(str(tmp_path))
    assert folder.fmt == "plain" and folder.adapters == {}
    assert generate.complete(folder, PROMPTS, max_new_tokens=8) == run
    assert run != generate.complete(generate.from_workdir(workdir), PROMPTS, max_new_tokens=8)


def test_raw_sends_the_text_without_the_bos():
    gen = generate.from_workdir(trained("fedsa"))
    raw = generate.complete(gen, PROMPTS[:1], raw=True, max_new_tokens=6)
    ids = gen.codec.encode(PROMPTS[0])  # no prefix: this tokenizer adds no bos
    new = decoder.generate(gen.model, gen.base, gen.adapters, np.asarray([ids]),
                           np.ones((1, len(ids)), np.int32), max_new_tokens=6,
                           eos_ids=(gen.codec.eos_id,), pad_id=gen.codec.pad_id)  # fmt: skip
    assert raw == [gen.codec.decode(completion.until_eos(np.asarray(new[0]), gen.codec.eos_id))]


def test_tiny_top_p_samples_the_greedy_tokens():
    """A nucleus of probability 1e-6 holds only the most likely token (decoder.generate)."""
    model = tiny_model()
    ids, mask = left_padded_prompts(model.config["vocab_size"])
    kw = dict(max_new_tokens=6, eos_ids=(-1,))
    greedy = decoder.generate(model, model.base, model.trainable["lora"], ids, mask, **kw)
    kw |= dict(temperature=1.0, key=jax.random.key(3))
    nucleus = decoder.generate(model, model.base, model.trainable["lora"], ids, mask,
                               top_p=1e-6, **kw)  # fmt: skip
    wide = decoder.generate(model, model.base, model.trainable["lora"], ids, mask, **kw)
    np.testing.assert_array_equal(nucleus, greedy)
    assert not np.array_equal(wide, greedy)  # a random tiny model's tokens are near-uniform
    with pytest.raises(ValueError, match="top_p"):
        decoder.generate(model, model.base, {}, ids, mask, top_p=0.0, **kw)


def test_the_command_prints_completions_and_bad_inputs_are_one_line(tmp_path):
    workdir = trained("fedsa")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    want = generate.complete(generate.from_workdir(workdir), PROMPTS, max_new_tokens=5)

    def command(*args):  # bytes: a random model's text may hold a carriage return
        argv = [sys.executable, "-m", "floranna_jax.generate", *args]
        return subprocess.run(argv, capture_output=True, cwd=REPO_ROOT, timeout=300)

    file = tmp_path / "prompts.txt"
    out = command(f"--workdir={workdir}", f"--prompt_file={file}", "--max_new_tokens=5")
    assert out.returncode == 0, out.stderr
    shown = "".join(
        f"--- {i + 1}: {p}\n{w}\n" for i, (p, w) in enumerate(zip(PROMPTS, want, strict=True))
    )
    assert out.stdout.decode() == shown
    bad = command(f"--workdir={workdir}", "--client=7", "--prompt=hi")
    assert bad.returncode == 2
    assert bad.stderr.decode().strip().splitlines() == [
        "error: --client=7: the run has clients 0 to 3"
    ]
    with pytest.raises(ConfigError, match="encoder classifier"):
        generate.from_workdir(trained_encoder(tmp_path))


def trained_encoder(tmp_path) -> str:
    """A 1-round GLUE smoke run: an encoder, which does not generate."""
    workdir = str(tmp_path / "glue")
    with shared_compilation():
        train.run(smoke_config(**{"train.num_rounds": 1}), workdir)
    return workdir


def test_a_run_stop_string_cuts_the_completion():
    gen = generate.from_workdir(trained("fedsa"))
    free = generate.complete(gen, PROMPTS[:1], max_new_tokens=12)[0]
    assert len(free) > 4, free  # a tiny random model's text, long enough to cut inside
    stop = free[3:5]
    cut = generate.complete(gen._replace(stops=(stop,)), PROMPTS[:1], max_new_tokens=12)[0]
    assert cut == free[: free.index(stop)]
