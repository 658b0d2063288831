"""Shared test fixtures: where the real data and checkpoints live, if anywhere.

Tests never require them: each fixture skips with the place it looked.
  FLORANNA_DATA_DIR    folder with glue/, gsm8k/, mbpp/, humaneval/ (default: ../shared/data
                       beside the repo)
  FLORANNA_MODELS_DIR  folder filled by shared/tools/fetch_models.sh
                       (default: ~/.cache/floranna/models)
"""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("FLORANNA_DATA_DIR", REPO.parent / "shared" / "data"))


def _models_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "floranna" / "models"
    return pathlib.Path(os.environ.get("FLORANNA_MODELS_DIR", default))


@pytest.fixture(scope="session")
def glue_dir() -> pathlib.Path:
    path = _data_dir() / "glue"
    if not path.is_dir():
        pytest.skip(f"no GLUE folder at {path} (set FLORANNA_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    path = _models_dir() / "all-MiniLM-L6-v2"
    if not (path / "model.safetensors").is_file():
        pytest.skip(
            f"no checkpoint at {path} (run shared/tools/fetch_models.sh, set FLORANNA_MODELS_DIR)"
        )
    return path


def _data_subdir(name: str, marker: str) -> pathlib.Path:
    path = _data_dir() / name
    if not (path / marker).is_file():
        pytest.skip(f"no {marker} at {path} (set FLORANNA_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def gsm8k_dir() -> pathlib.Path:
    return _data_subdir("gsm8k", "test.jsonl")


@pytest.fixture(scope="session")
def mbpp_dir() -> pathlib.Path:
    return _data_subdir("mbpp", "mbpp.jsonl")


@pytest.fixture(scope="session")
def humaneval_dir() -> pathlib.Path:
    return _data_subdir("humaneval", "HumanEval.jsonl.gz")


@pytest.fixture(scope="session")
def smollm_gguf() -> pathlib.Path:
    """SmolLM2-135M-Instruct as llama.cpp's 4-bit GGUF (convert it with convert_gguf)."""
    path = _models_dir() / "SmolLM2-135M-Instruct" / "model.gguf"
    if not path.is_file():
        pytest.skip(
            f"no GGUF file at {path} (run shared/tools/fetch_models.sh, set FLORANNA_MODELS_DIR)"
        )
    return path
