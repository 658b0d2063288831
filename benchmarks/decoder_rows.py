"""Training on real GSM8K rows for ``benchmarks.decoder --data=real``: the project packed,
the peer dynamically padded, on the same examples in the same steps.

The rows are the run's own (:func:`floranna_jax.tasks.problems.read_corpus` of
``configs/gsm8k.py`` on local files: chat-formatted question, answer, end of sequence; loss
on the answer tokens only). Each step takes ``b`` consecutive training examples. The
project packs them as a run does (:mod:`floranna_jax.packing`, ``data.packing``): rows of a
length chosen from the examples' lengths for batches of ``b``, every turn padded to the
same row count so one program serves all turns. The peer pads each batch to its longest
example, as ``DataCollatorForSeq2Seq`` does, with ``-100`` labels on the prompt and padding
(transformers' own shift). Both sides count the same real tokens per second.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np

from benchmarks.real_data import Clock
from floranna_jax import clients, packing
from floranna_jax.tasks import problems

REPO = pathlib.Path(__file__).resolve().parents[1]


def gsm8k_rows(model_folder: str, data_dir: str, count: int) -> dict[str, np.ndarray]:
    """``input_ids, attention_mask, loss_mask [count, L]`` of the first ``count`` GSM8K
    training examples, tokenized as a run of ``configs/gsm8k.py`` does."""
    spec = importlib.util.spec_from_file_location("gsm8k_config", REPO / "configs" / "gsm8k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.path, c.data.source, c.data.dir = model_folder, "local", data_dir
    c.data.max_train_examples, c.eval.max_examples = count, 1
    corpus = problems.read_corpus("gsm8k", c)
    return problems.item_arrays(corpus.train, corpus.length, c.data.max_length)


def turns(rows: dict, lengths: np.ndarray, shape: tuple[int, int, int]) -> tuple[list, list]:
    """``(project, peer)`` batches of ``shape = (turns, steps, b)`` consecutive examples:
    packed ``[steps, R, T]`` with one ``R`` for all turns, and padded per batch."""
    take = np.arange(np.prod(shape)).reshape(shape)
    real = np.ones(shape[1:], bool)
    dense = packing.decide(True, rows, None, shape[2]).train  # the row length a run takes
    layout = packing.layout(rows, dense)
    packed = [packing.batches(rows, t, real, layout) for t in take]
    R = max(packing.rows(p) for p in packed)
    project = [packing.pad_rows(p, R) for p in packed]
    peer = []
    for t in take:
        batches = []
        for examples in t:
            n = int(lengths[examples].max())
            ids = rows["input_ids"][examples, :n].astype(np.int64)
            labels = np.where(rows["loss_mask"][examples, :n] > 0, ids, -100)
            mask = rows["attention_mask"][examples, :n].astype(np.int64)
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        peer.append(batches)
    return project, peer


def donated_state(opt, trainable) -> tuple:
    """Fresh adapters and optimizer state for a step that donates them, committed to the
    device as the step's outputs are: with uncommitted inputs, the first timed call (fed
    the warm-up's outputs) would compile the step a second time."""
    device = jax.devices()[0]
    trainable = jax.device_put(jax.tree.map(jax.numpy.copy, trainable), device)
    return trainable, jax.device_put(clients.init_opt_state(opt, trainable), device)


def check_no_compiles(clock: Clock, what: str) -> None:
    """Timed calls must run compiled programs: a compilation inside them is a bench bug."""
    if clock.compiles:
        raise RuntimeError(f"{what}: {clock.compiles} XLA compilation(s) inside timed calls")


def take_turns(rows: str, rounds: int, project_turn, peer_turn) -> tuple[dict, dict, Clock]:
    """Training turns 0..``rounds``, project then peer; turn 0 compiles and warms up, untimed.
    ``project_turn(r)`` returns the turn's loss (computed); ``peer_turn(r)`` (None: no peer)
    returns the peer's step losses and its own wall and CPU seconds. Returns each side's
    clock of the timed turns, each side's loss per turn, and the project's clock of turn 0."""
    clocks, losses = {"project": Clock(), "peer": Clock()}, {"project": [], "peer": []}
    first = Clock()
    for r in range(rounds + 1):
        with clocks["project"] if r else first:
            loss = project_turn(r)
        losses["project"].append(float(loss))
        if peer_turn is not None:
            out, wall, cpu = peer_turn(r)
            losses["peer"].append(float(np.mean(out)))
            if r:
                clocks["peer"].wall += wall
                clocks["peer"].cpu += cpu
        print(f"training on {rows}, turn {r}: loss {losses['project'][-1]:.4f} (peer "
              f"{losses['peer'][-1] if peer_turn else float('nan'):.4f})", flush=True)  # fmt: skip
    check_no_compiles(clocks["project"], f"training on {rows}")
    return clocks, losses, first


def bench_real_training(a, model, local_update, peer) -> dict:
    """Turns of ``--steps`` steps of ``--real_batch_size`` GSM8K examples, project then
    peer; real tokens per second, and the tokens each side computes (padding included)."""
    shape = (a.rounds + 1, a.steps, a.real_batch_size)
    rows = gsm8k_rows(a.model, a.data_dir, int(np.prod(shape)))
    lengths = packing.token_lengths(rows)
    project, padded = turns(rows, lengths, shape)
    opt = clients.make_optimizer("adamw", a.learning_rate)
    state = donated_state(opt, model.trainable)
    step_mask, key = jax.numpy.ones((a.steps,), jax.numpy.float32), jax.random.key(0)
    run = jax.jit(local_update, donate_argnums=(1, 2))
    if peer is not None:
        peer.call("reset")  # both sides start from a fresh adapter

    def project_turn(r):
        nonlocal state
        *state, metrics = jax.block_until_ready(run(model.base, *state, project[r], step_mask,
                                                    key))  # fmt: skip
        return metrics["loss"]

    peer_turn = None if peer is None else lambda r: peer.call("train_batches", padded[r])
    clocks, losses, _ = take_turns("real rows", a.rounds, project_turn, peer_turn)
    tokens = float(lengths[a.steps * a.real_batch_size :].sum())  # turns 1.., real tokens
    computed = {"project": sum(p["input_ids"].size for p in project[1:]),
                "peer": sum(b["input_ids"].size for t in padded[1:] for b in t)}  # fmt: skip
    out = {"row_length": int(project[0]["input_ids"].shape[-1]),
           "rows_per_step": int(project[0]["input_ids"].shape[1])}  # fmt: skip
    for side in clocks if peer is not None else ("project",):
        per_s, per_cpu = tokens / clocks[side].wall, tokens / clocks[side].cpu
        out[side] = {"tokens": tokens, "wall_s": clocks[side].wall, "per_s": per_s,
                     "per_cpu_s": per_cpu, "computed_tokens": computed[side],
                     "mean_loss_per_turn": losses[side]}  # fmt: skip
    if peer is not None:
        out["ratio"] = {k: out["project"][k] / out["peer"][k] for k in ("per_s", "per_cpu_s")}
        out["ratio"] = {"wall": out["ratio"]["per_s"], "cpu": out["ratio"]["per_cpu_s"]}
    return out
