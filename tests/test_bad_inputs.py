"""Every bad input is one line: exit code 2, a single ``error: ...`` line on stderr naming
the field, file, line or value, before anything is compiled, with the workdir untouched."""

import os
import subprocess
import sys

import pytest
from smoke_setup import REPO


def _launch(*args: str, workdir) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "launch.py", "--config=configs/glue.py:smoke", f"--workdir={workdir}",
           *args]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _snapshot(path):
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return open(path, "rb").read()
    return {
        os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(path)
        for f in files
    }


def _assert_one_line(proc, words, code=2):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])


CONFIG_CASES = [
    (["--config.train.num_round=3"], ["train.num_round", "did you mean train.num_rounds"]),
    (["--config.trian.seed=3"], ["trian.seed", "did you mean train.seed"]),
    (["--config.train.num_rounds=abc"], ["train.num_rounds", "abc"]),
    (["--config.client.local_steps=2.5"], ["client.local_steps", "2.5"]),
    (["--config.client.micro_batch_size=5"], ["client.micro_batch_size", "5", "divide"]),
    (["--config.model.base_dtype=float16"], ["model.base_dtype", "float16", "bfloat16"]),
    (["--config.server.stepz=3"], ["server.stepz", "did you mean server.steps"]),
    (["--config.server.name=fedit", "--config.server.steps=3"],
     ["server.steps", "'fedit'", "floranna"]),
    (["--config.lora.targets=('query','valu')"], ["lora.targets", "valu", "query"]),
    (["--config.client.learning_rate=1e39"], ["client.learning_rate", "float32", "1e+39"]),
    (["--config.client.learning_rate=inf"], ["client.learning_rate", "inf"]),
    (["--config.server.learning_rate=nan"], ["server.learning_rate", "nan"]),
    (["--config.partition.alpha=0"], ["partition.alpha", "0"]),
    (["--config.train.clients_per_chunk=-1"], ["train.clients_per_chunk", "-1"]),
]  # fmt: skip


@pytest.mark.parametrize("args, words", CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_bad_config_is_one_line(args, words, tmp_path):
    workdir = tmp_path / "run"
    _assert_one_line(_launch(*args, workdir=workdir), words)
    assert not workdir.exists()


def test_workdir_that_is_a_file_is_one_line(tmp_path):
    workdir = tmp_path / "a_file"
    workdir.write_text("keep me\n")
    _assert_one_line(_launch(workdir=workdir), [str(workdir), "is a file"])
    assert workdir.read_text() == "keep me\n"


SST2_HEADER = "sentence\tlabel\n"
DATA_CASES = {
    "no_tab": (SST2_HEADER + "fine movie\t1\nno tab on this line\n", ["train.tsv:3", "1 tab"]),
    "label_7": (SST2_HEADER + "fine movie\t1\nbad label\t7\n", ["train.tsv:3", "'7'"]),
    "empty": ("", ["train.tsv", "empty file"]),
    "header_only": (SST2_HEADER, ["train.tsv", "no examples"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_file_is_one_line(case, tmp_path, minilm_dir):
    text, words = DATA_CASES[case]
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text(text)
    (folder / "dev.tsv").write_text(SST2_HEADER + "a fine film\t1\n")
    workdir = tmp_path / "run"
    args = ["--config.model.source=pretrained", f"--config.model.path={minilm_dir}",
            "--config.data.source=glue", f"--config.data.dir={tmp_path / 'glue'}"]  # fmt: skip
    _assert_one_line(_launch(*args, workdir=workdir), words)
    assert not workdir.exists()


@pytest.mark.parametrize(
    "config, words",
    [("configs/nope.py", ["--config", "No such file", "configs/nope.py"]),
     ("configs/glue.py:bogus", ["configs/glue.py", "'bogus'", "smoke"])],
)  # fmt: skip
def test_bad_config_file_is_one_line(config, words, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    workdir = tmp_path / "run"
    cmd = [sys.executable, "launch.py", f"--config={config}", f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    _assert_one_line(proc, words)
    assert not workdir.exists()
