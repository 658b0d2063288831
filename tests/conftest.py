"""Shared test fixtures: where the real data and checkpoints live, if anywhere.

Tests never require them: each fixture skips with the place it looked.
  FLORANNA_DATA_DIR    folder with glue/, gsm8k/, ... (default: ../shared/data beside the repo)
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


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    path = _models_dir() / "SmolLM2-135M-Instruct" / "model.gguf"
    if not path.is_file():
        pytest.skip(
            f"no GGUF at {path} (run shared/tools/fetch_models.sh, set FLORANNA_MODELS_DIR)"
        )
    return path
