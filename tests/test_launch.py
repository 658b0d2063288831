"""Tests of the entry point (launch.py): a malformed override is one clear line on
stderr and exit code 2, before anything is built; the real defaults validate."""

import pytest
from smoke_setup import REPO, launch, smoke_config

from floranna_jax import config_check


@pytest.mark.parametrize(
    "override, words",
    [
        ("--config.server.name=nope", ["server.name", "'nope'", "fedit", "floranna"]),
        ("--config.train.num_rounds=-1", ["train.num_rounds", "positive integer", "-1"]),
        ("--config.data.task=sst3", ["data.task", "sst3", "sst2"]),
        ("--config.partition.scheme=zipf", ["partition.scheme", "dirichlet", "iid"]),
    ],
)
def test_bad_override_is_one_clear_line(override, words, tmp_path):
    proc = launch(override, workdir=tmp_path / "run")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, proc.stderr
    for word in words:
        assert word in error_lines[0], (word, error_lines[0])
    assert not (tmp_path / "run").exists()  # failed before building anything


def test_missing_local_model_folder_is_named(tmp_path):
    proc = launch("--config.model.source=pretrained", f"--config.model.path={tmp_path}/nowhere",
                  "--config.data.source=glue", workdir=tmp_path / "run")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.path" in proc.stderr and "nowhere" in proc.stderr


def test_reference_defaults_validate():
    config = smoke_config()
    hparams = config_check.validate(config)
    assert config.server.name == "floranna" and "steps" in hparams
    reference = config_check.load_file(REPO / "configs/glue.py")
    assert reference.model.path == "FacebookAI/roberta-base" and reference.data.task == "sst2"
    config_check.validate(reference)  # a hub id is not a local path: valid without network


def test_unreachable_hub_says_how_to_use_local_files(tmp_path):
    proc = launch("--config.model.source=pretrained", "--config.model.path=floranna-test/no-such",
                  "--config.data.source=glue", workdir=tmp_path / "run")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--config.model.path=" in proc.stderr and "--config.data.dir=" in proc.stderr
    assert not (tmp_path / "run").exists()
