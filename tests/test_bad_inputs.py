"""Every bad input is one line: exit code 2, a single ``error: ...`` line on stderr naming
the field, file, line or value, before anything is compiled, with the workdir untouched."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from smoke_setup import NO_BAR, launch

from floranna_jax import workdir_lock


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
    (["--config.train.step_progress=maybe"], ["train.step_progress", "maybe"]),
]  # fmt: skip


@pytest.mark.parametrize("args, words", CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_bad_config_is_one_line(args, words, tmp_path):
    workdir = tmp_path / "run"
    _assert_one_line(launch(*args, workdir=workdir), words)
    assert not workdir.exists()


@pytest.mark.parametrize(
    "module, flags", [("export", ["--out=out"]), ("generate", ["--prompt=hi"])]
)
def test_a_flag_without_its_dashes_is_refused(module, flags, tmp_path):
    # "workdir=..." for "--workdir=...": absl would leave it as a positional argument.
    cmd = [sys.executable, "-m", f"floranna_jax.{module}", "workdir=x", "--workdir=x", *flags]
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "unexpected arguments: ['workdir=x']"
    assert not any(tmp_path.iterdir())


def test_a_stray_argument_stops_a_run_before_it_starts(tmp_path):
    proc = launch("workdir=x", workdir=tmp_path / "run")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "unexpected arguments: ['workdir=x']"
    assert not (tmp_path / "run").exists()


def test_workdir_that_is_a_file_is_one_line(tmp_path):
    workdir = tmp_path / "a_file"
    workdir.write_text("keep me\n")
    _assert_one_line(launch(workdir=workdir), [str(workdir), "is a file"])
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
    _assert_one_line(launch(*args, workdir=workdir), words)
    assert not workdir.exists()


@pytest.mark.parametrize(
    "config, words",
    [("configs/nope.py", ["--config", "No such file", "configs/nope.py"]),
     ("configs/glue.py:bogus", ["configs/glue.py", "'bogus'", "smoke"])],
)  # fmt: skip
def test_bad_config_file_is_one_line(config, words, tmp_path):
    workdir = tmp_path / "run"
    _assert_one_line(launch(config=config, workdir=workdir), words)
    assert not workdir.exists()


def test_a_workdir_in_use_is_one_line_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    with workdir_lock.hold(str(workdir)):  # this test process is the first run
        proc = launch(workdir=workdir)
    _assert_one_line(proc, [str(workdir), f"pid {os.getpid()}", "another --workdir"])
    assert not workdir.exists()  # the first run wrote nothing; its lock went with it


@pytest.mark.parametrize("where", ["/proc", "file"])
def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path, where):
    (tmp_path / "a_file").write_text("keep me\n")
    workdir = "/proc/x" if where == "/proc" else str(tmp_path / "a_file" / "run")
    _assert_one_line(launch(workdir=workdir), [workdir, "cannot create", "choose a folder"])


def _gsm8k_folder(root, train_text=None, test_text=None):
    """A local GSM8K folder of 40 training and 8 test problems, either file replaceable."""
    rows = [
        json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
        for i in range(40)
    ]
    folder = root / "data" / "gsm8k"
    folder.mkdir(parents=True)
    default_test = "\n".join(rows[:8]) + "\n"
    (folder / "train.jsonl").write_text(train_text or "\n".join(rows) + "\n")
    (folder / "test.jsonl").write_text(default_test if test_text is None else test_text)
    return root / "data"


def _launch_gsm8k(*args, workdir):
    return launch(*args, config="configs/gsm8k.py:smoke", workdir=workdir)


SURROGATE_ROW = '{"question": "What \\ud800 is 1 + 1?", "answer": "#### 2"}\n'
GSM8K_CASES = {
    "lone_surrogate": ({"train_text": SURROGATE_ROW},
                       ["train.jsonl:1", "field 'question'", "surrogate", "fix or remove"]),
    "empty_test_file": ({"test_text": ""}, ["test.jsonl", "no records", "empty file"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(GSM8K_CASES))
def test_bad_json_data_is_one_line(case, tmp_path):
    files, words = GSM8K_CASES[case]
    data = _gsm8k_folder(tmp_path, **files)
    workdir = tmp_path / "run"
    proc = _launch_gsm8k("--config.data.source=local", f"--config.data.dir={data}",
                         workdir=workdir)  # fmt: skip
    _assert_one_line(proc, words)
    assert not workdir.exists()


def test_every_answer_cut_by_max_length_is_one_line(tmp_path):
    proc = _launch_gsm8k("--config.data.max_length=16", workdir=tmp_path / "run")
    _assert_one_line(proc, ["data.max_length", "16", "nothing would be learned", "raise it above"])


def test_an_encoder_for_a_decoder_task_is_one_line(tmp_path):
    proc = _launch_gsm8k("--config.model.model_type=bert", workdir=tmp_path / "run")
    _assert_one_line(proc, ["model.model_type", "'bert' is an encoder", "needs a decoder", "llama"])


def test_an_encoder_checkpoint_for_a_decoder_task_is_one_line(tmp_path, minilm_dir):
    args = ("--config.model.source=pretrained", f"--config.model.path={minilm_dir}",
            "--config.data.tokenizer=bytes")  # fmt: skip
    proc = _launch_gsm8k(*args, workdir=tmp_path / "run")
    _assert_one_line(proc, ["model.path", "holds a bert model", "needs a decoder"])
    assert "lora.targets" not in proc.stderr


@pytest.mark.parametrize("given", ["file", "folder"])
def test_a_gguf_model_path_says_convert_it_first(tmp_path, given):
    gguf = tmp_path / "SmolLM2" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(60))  # what the run must not try to read
    path = gguf if given == "file" else gguf.parent
    args = ("--config.model.source=pretrained", f"--config.model.path={path}")
    proc = _launch_gsm8k(*args, workdir=tmp_path / "run")
    dest = f"{gguf.parent}-hf"
    _assert_one_line(proc, ["model.path", "GGUF", f"python -m floranna_jax.convert_gguf {gguf} "
                            f"{dest}", f"--config.model.path={dest}"])  # fmt: skip


def test_a_truncated_safetensors_is_one_line(tmp_path, minilm_dir):
    folder = tmp_path / "minilm"
    shutil.copytree(minilm_dir, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    with open(minilm_dir / "model.safetensors", "rb") as f:
        (folder / "model.safetensors").write_bytes(f.read(1 << 20))  # a download cut short
    args = ["--config.model.source=pretrained", f"--config.model.path={folder}"]
    _assert_one_line(launch(*args, workdir=tmp_path / "run"),
                     ["model.safetensors", "truncated", "download or save it again"])  # fmt: skip


@pytest.fixture(scope="module")
def one_round(tmp_path_factory):
    """A smoke workdir holding the checkpoint of round 1."""
    workdir = tmp_path_factory.mktemp("one_round")
    proc = launch("--config.train.num_rounds=1", NO_BAR, workdir=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def _flip_a_bit(default):
    data = next(p for p in (default / "d").iterdir())
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["flipped_bit", "empty_manifest"])
def test_a_damaged_checkpoint_is_one_line(one_round, tmp_path, damage):
    workdir = tmp_path / "run"
    shutil.copytree(one_round, workdir)
    default = workdir / "checkpoints" / "1" / "default"
    if damage == "flipped_bit":
        _flip_a_bit(default)
    else:
        (default / "manifest.ocdbt").write_bytes(b"")
    proc = launch(NO_BAR, workdir=workdir)
    # No "Event loop is closed" traceback from Orbax's threads after the line.
    _assert_one_line(proc, ["cannot resume from round 1", "DATA_LOSS", "remove checkpoints/1"])


@pytest.fixture
def small_disk(tmp_path):
    """A 60 KiB tmpfs: the smoke run's first checkpoint does not fit (needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60k", "tmpfs", str(disk)],
                           capture_output=True, text=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_line_and_the_run_resumes(small_disk):
    workdir = small_disk / "run"
    proc = launch(NO_BAR, workdir=workdir)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert proc.returncode == 1, proc.stderr[-3000:]
    # Only the progress bar and one error line: no Orbax or TensorBoard thread tracebacks.
    assert len(errors) == 1 and errors[0].startswith("error: cannot write"), proc.stderr[-3000:]
    assert "No space left" in errors[0] and "run the same command again" in errors[0]
    # The rest is progress bars (rounds, evaluation) and tqdm's cursor-ups.
    bars = re.compile(r"^\s*(\x1b\[A)*\s*((rounds|eval \w+):.*)?$")
    assert all(bars.match(line) or line.startswith("error: ") for line in lines), proc.stderr[
        -3000:
    ]
    subprocess.run(["mount", "-o", "remount,size=10m", str(small_disk)], check=True)
    resumed = launch(NO_BAR, workdir=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
