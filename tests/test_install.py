"""The README's install is enough: every package the library imports is declared in
pyproject.toml, and the decoder path's chat prompt renders on ``.[test]`` alone.

CI runs this file first in a fresh environment with exactly ``pip install -e ".[test]"``
(no torch, whose install would bring jinja2 in and hide a missing declaration).
"""

import ast
import importlib.metadata
import json
import pathlib
import re
import sys
import tomllib

import pytest
from smoke_setup import REPO

from floranna_jax.data import completion

# Modules that may import an extra's packages, and the extra that declares them.
EXTRA_OF = {
    "floranna_jax/flower/": "flower",
    "floranna_jax/convert_gguf.py": "convert",
    "floranna_jax/privacy.py": "privacy",
}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> dict[str, set[str]]:
    """``{"": main dependencies, extra: its packages}``, as normalized distribution names."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {"": {_name(r) for r in project["dependencies"]}}
    for extra, reqs in project["optional-dependencies"].items():
        out[extra] = {_name(r) for r in reqs}
    return out


def _imports(path: pathlib.Path) -> set[str]:
    """The top-level modules a file imports, lazily or not (relative imports left out)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_every_imported_package_is_declared():
    declared = _declared()
    dists = importlib.metadata.packages_distributions()
    missing = []
    for path in sorted((REPO / "floranna_jax").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        extra = next((e for prefix, e in EXTRA_OF.items() if rel.startswith(prefix)), None)
        allowed = declared[""] | (declared[extra] if extra else set())
        for module in _imports(path) - set(sys.stdlib_module_names) - {"floranna_jax"}:
            names = {_name(d) for d in dists.get(module, [module])}
            if not names & allowed:
                missing.append(f"{rel}: {module} ({', '.join(sorted(names))})")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)


def test_jinja2_is_declared_for_chat_templates():
    # transformers imports jinja2 only when a chat template is rendered, so no import scan
    # of this project can see it; the decoder tasks render one whenever a tokenizer has it.
    assert "jinja2" in _declared()[""]


@pytest.fixture
def chat_tokenizer(tmp_path):
    """A tiny word-level tokenizer with a chat template, saved and loaded as a user's is."""
    tokenizers = pytest.importorskip("tokenizers")
    from floranna_jax.data import glue

    words = ["<pad>", "<eos>", "<user>", "<bot>", "how", "many", "?"]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    template = (
        "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<bot>{% endif %}"
    )
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>",
              "pad_token": "<pad>", "chat_template": template}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return glue.load_tokenizer(tmp_path)


def test_the_chat_prompt_renders_on_the_readme_install(chat_tokenizer):
    codec = completion.hf_codec(chat_tokenizer)
    assert completion.resolve_format(codec, "auto") == "chat"
    assert codec.chat("how many ?") == "<user> how many ? <bot>"
