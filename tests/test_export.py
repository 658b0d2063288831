"""Export and import round trips with transformers + peft (PyTorch CPU, test-only).

An exported adapter on its base, and an exported merged folder alone, compute the run's
logits; FedSA exports a client's own ``B``; FLoRA exports merged only; ``--round`` picks an
earlier checkpoint; an adapter imported with ``lora.init_from`` exports unchanged.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from export_cases import (
    REPO_ROOT,
    TOLERANCE,
    base_folder,
    max_real_diff,
    project_logits,
    run_config,
    torch,
    torch_logits,
    trained,
    transformers,
)
from safetensors import safe_open

from floranna_jax import experiment, export, models, peft_folder, result, train
from floranna_jax.errors import ConfigError
from floranna_jax.models import loading

peft = pytest.importorskip("peft", reason="peft not installed")


def _tensors(folder) -> dict[str, np.ndarray]:
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _peft_model(adapter_folder):
    base = transformers.LlamaForCausalLM.from_pretrained(base_folder(), attn_implementation="eager")
    return peft.PeftModel.from_pretrained(base, adapter_folder).eval()


def test_exported_adapter_on_its_base_gives_the_run_logits(tmp_path):
    workdir = trained("fedit")
    print(export.export(workdir, str(tmp_path)))
    res = result.load(workdir)
    assert max(float(np.abs(f["B"]).max()) for f in res.state.lora.values()) > 0  # trained
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_folder())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (
        4,
        8.0,
        ["q_proj", "v_proj"],
    )
    diff = max_real_diff(project_logits(res), torch_logits(_peft_model(tmp_path)))
    print(f"fedit adapter: max |logits - peft| = {diff:.2e}")
    assert diff < TOLERANCE


@pytest.mark.parametrize("method", ["fedit", "flora"])
def test_exported_merged_folder_gives_the_run_logits(tmp_path, method):
    """FLoRA's merges live in the base: the merged folder carries them."""
    workdir = trained(method)
    export.export(workdir, str(tmp_path), merged=True)
    res = result.load(workdir)
    assert result.keeps_merges(res) == (method == "flora")
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    diff = max_real_diff(project_logits(res), torch_logits(ref.eval()))
    print(f"{method} merged: max |logits - transformers| = {diff:.2e}")
    assert diff < TOLERANCE
    assert (tmp_path / "tokenizer.json").is_file()
    assert loading.checkpoint_dtype(tmp_path) == "float32"  # the base's dtype


def test_merged_folder_keeps_a_bfloat16_base_in_bfloat16(tmp_path):
    bf16 = tmp_path / "bf16"
    ref = transformers.LlamaForCausalLM.from_pretrained(base_folder())
    ref.to(dtype=torch.bfloat16).save_pretrained(bf16)
    assert loading.checkpoint_dtype(bf16) == "bfloat16"
    model = models.load_pretrained(bf16, num_labels=0)
    models.save_pretrained(model, tmp_path / "out", loading.checkpoint_dtype(bf16))
    assert loading.checkpoint_dtype(tmp_path / "out") == "bfloat16"
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16


def test_round_exports_an_earlier_checkpoint(tmp_path):
    workdir = trained("fedit")
    export.export(workdir, str(tmp_path / "r1"), round_=1)
    export.export(workdir, str(tmp_path / "r2"))
    first, last = result.load(workdir, 1), result.load(workdir)
    spec = experiment.lora_spec(first.config)
    for res, folder in ((first, "r1"), (last, "r2")):
        back = peft_folder.read(tmp_path / folder, res.model, spec, 0)
        jax.tree.map(np.testing.assert_array_equal, back["lora"], res.state.lora)
    assert any(not np.array_equal(f["B"], last.state.lora[n]["B"])
               for n, f in first.state.lora.items())  # fmt: skip


def test_fedsa_client_exports_its_own_B(tmp_path):
    workdir = trained("fedsa")
    print(export.export(workdir, str(tmp_path), client=1))
    res = result.load(workdir)
    own = result.trainable(res, 1)["lora"]
    for n, f in own.items():  # the global A, client 1's B
        np.testing.assert_array_equal(f["A"], res.state.lora[n]["A"])
        np.testing.assert_array_equal(f["B"], res.state.method["B"][n][1])
    assert any(not np.array_equal(f["B"], res.state.lora[n]["B"]) for n, f in own.items())
    diff = max_real_diff(project_logits(res, client=1), torch_logits(_peft_model(tmp_path)))
    print(f"fedsa client 1 adapter: max |logits - peft| = {diff:.2e}")
    assert diff < TOLERANCE


def test_what_cannot_be_exported_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="keeps no personal adapter"):
        export.export(trained("fedit"), str(tmp_path), client=1)
    with pytest.raises(ConfigError, match="rounds 1, 2; choose one"):
        export.export(trained("fedit"), str(tmp_path), round_=5)
    out = subprocess.run(
        [sys.executable, "-m", "floranna_jax.export", f"--workdir={trained('flora')}",
         f"--out={tmp_path}"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: method flora keeps its merged updates in the base weights, which a LoRA "
        "adapter cannot carry; export with --merged"
    ]


def test_import_then_export_returns_the_same_adapter(tmp_path):
    exported = tmp_path / "exported"
    export.export(trained("fedit"), str(exported))
    config = run_config("fedit", **{"lora.init_from": str(exported)})
    run_ = train.build(config)
    res = result.Result(config, run_.exp.task, run_.exp.model, run_.server_.method, run_.state)
    export.write_adapter(res, str(tmp_path / "again"))
    first, again = _tensors(exported), _tensors(tmp_path / "again")
    assert sorted(first) == sorted(again)
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    jax.tree.map(
        np.testing.assert_array_equal, run_.state.lora, result.load(trained("fedit")).state.lora
    )


@pytest.mark.parametrize("field, value", [("lora.rank", 8), ("lora.targets", ("q_proj",))])
def test_import_with_other_settings_is_one_error_line(tmp_path, field, value):
    export.export(trained("fedit"), str(tmp_path))
    config = run_config("fedit", **{"lora.init_from": str(tmp_path), field: value})
    with pytest.raises(ConfigError) as e:
        train.build(config)
    message = str(e.value)
    assert message.startswith(f"config field {field}: ") and "\n" not in message
    assert str(tmp_path) in message


def test_import_reaches_every_client_or_is_refused(tmp_path):
    """FedSA's clients start from their own copy of the imported B; FLoRA, which restarts
    its clients from fresh adapters, would drop the import after round 0: refused."""
    export.export(trained("fedit"), str(tmp_path))
    imported = peft_folder.read(tmp_path, result.load(trained("fedit")).model,
                                experiment.lora_spec(run_config("fedit")), 0)  # fmt: skip
    fedsa = train.build(run_config("fedsa", **{"lora.init_from": str(tmp_path)}))
    for n, B in fedsa.state.method["B"].items():
        np.testing.assert_array_equal(B, np.broadcast_to(imported["lora"][n]["B"], B.shape))
    with pytest.raises(ConfigError, match="flora restarts its clients from fresh adapters"):
        train.build(run_config("flora", **{"lora.init_from": str(tmp_path)}))
