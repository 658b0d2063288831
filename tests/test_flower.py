"""Tests of the Flower federation (floranna_jax/flower/): what crosses the network, the
server's gate on uploads, faults, and rounds through Flower equal to the in-process rounds.

Fast tests (3.5 min on a shared 2-core CPU at load average 10) route Flower ``Message``s
through the real ServerApp and ClientApp in one process (:class:`FakeGrid`, Flower's
``Grid`` interface), among them one run both ways, every metrics row compared (training and
evaluation). Slow ones: every other method through the same (about 60 s), FedSA's rows
both ways (about 60 s), and a SuperLink with three SuperNodes as separate processes on
Flower's deployment runtime (insecure, localhost): FedIT and FLoRA-NA equal to the
in-process run (about 4 min), a SuperNode killed mid-round (about 2 min; every node with
its warm ClientApp process, warm_node.py), and Ctrl-C on ``flower.local`` (about 1 min).
The slow ones run only when asked for (``-m slow``), so the suite's plain ``pytest -q``
(CI) spends the fast tests' time here."""

import contextlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from smoke_setup import XLA_CACHE, config_file, shared_compilation, smoke_config

from floranna_jax import checkpoint, experiment, keys, reporting, server, train
from floranna_jax.errors import ConfigError
from floranna_jax.flower import client_app, local, runconfig, server_app, shards, wire
from floranna_jax.flower import transport as flower_transport
from floranna_jax.tasks import generation, problems
from floranna_jax.tasks.task import ROW_KEY


@pytest.fixture(autouse=True, scope="module")
def _shared_compilation():
    with shared_compilation():
        yield


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request):
    # Asked for: ``-m slow`` or ``-m "slow or ..."``; ``-m "not slow"`` is not asking.
    asked = re.search(r"(?<!not )\bslow\b", request.config.option.markexpr or "")
    if request.node.get_closest_marker("slow") and not asked:
        pytest.skip("slow (minutes): runs with -m slow")


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Flower stamps every message with the run of its process; here, a made-up one."""
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _config(**overrides):
    return smoke_config(**{"partition.num_clients": 3, "train.clients_per_round": 3,
                           "ckpt.every_rounds": 1, **overrides})  # fmt: skip


def _trainable(name: str = "fedit"):
    config = _config(**{"server.name": name})
    return experiment.build_model(config, 2, keys.model_key(0)).trainable


# ----------------------------------------------------------------------------- wire


def test_a_good_upload_passes_the_gate():
    expected = wire.leaves(_trainable())
    assert wire.check_update(dict(expected), expected) == ""


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda v, k: v | {k: np.full_like(v[k], np.nan)}, r"lora\|.*\|A has non-finite values"),
        (lambda v, k: v | {k: v[k][:, :-1]}, r"shape \(4, 63\), expected \(4, 64\)$"),
        (lambda v, k: v | {k: np.concatenate([v[k], v[k][:1]])}, r"\(rank 5, expected 4\)"),
        (lambda v, k: v | {k: v[k].astype(np.float16)}, r"dtype float16, expected float32"),
        (lambda v, k: {n: x for n, x in v.items() if n != k}, r"missing leaf lora\|.*\|A"),
        (lambda v, k: v | {"lora|extra|A": v[k]}, r"unexpected leaf lora\|extra\|A"),
    ],
    ids=["nan", "shape", "rank", "dtype", "missing", "unexpected"],
)
def test_a_bad_upload_is_rejected_naming_the_leaf(corrupt, reason):
    expected = wire.leaves(_trainable())
    key = next(k for k in expected if k.endswith("|A"))
    assert re.search(reason, wire.check_update(corrupt(dict(expected), key), expected))


def test_a_reply_needs_finite_loss_and_examples():
    expected = wire.leaves(_trainable())
    update = wire.pack(expected)

    def reply(**metrics):
        good = {"loss": 0.5, "steps": 3, "examples": 48.0, "num-examples": 60}
        return RecordDict({"update": update, "metrics": MetricRecord(good | metrics)})

    assert wire.check_reply(reply(), expected) == ""
    assert wire.check_reply(reply(loss=float("nan")), expected) == "non-finite training loss nan"
    assert "num-examples is 0" in wire.check_reply(reply(**{"num-examples": 0}), expected)
    assert "no update" in wire.check_reply(RecordDict({"update": update}), expected)


def test_a_packed_record_gives_back_every_leaf_and_rejects_a_malformed_one():
    values = wire.leaves(_trainable()) | {"scalar": np.float64(2.5), "none": np.zeros((0, 3))}
    record = wire.pack(values)
    assert list(record) == [wire.PACKED]  # one Flower object for the whole tree
    back = wire.from_record(record)
    assert list(back) == list(values)
    for k, v in values.items():
        assert back[k].dtype == np.asarray(v).dtype and back[k].shape == np.shape(v)
        np.testing.assert_array_equal(back[k], v)
    blob = record[wire.PACKED].numpy()
    longer = np.concatenate([blob, blob[:3]])
    for cut, reason in ((blob[:-4], "runs past the end"), (blob[:30], "malformed"),
                        (longer, "3 bytes after the last array")):  # fmt: skip
        with pytest.raises(ValueError, match=reason):
            wire.from_record(ArrayRecord({wire.PACKED: Array(cut)}))
    with pytest.raises(ValueError, match="expected one 'leaves'"):
        wire.from_record(ArrayRecord({"x": Array(np.zeros(3))}))


@pytest.mark.parametrize("name, kept_away", [("ffa", "A"), ("fedsa", "B"), ("fedit", None)])
def test_private_leaves_never_travel(name, kept_away):
    method = server.make(name)
    tree = _trainable(name)
    record = wire.to_record(tree, lambda path: not method.private(path))
    sent = {wire.split(k)[-1] for k in wire.from_record(record) if k.startswith("lora")}
    assert sent == {"A", "B"} - {kept_away}
    # The receiver fills what was not sent from its own tree.
    twice = jax.tree.map(lambda x: 2 * x, tree)
    filled = wire.fill(twice, wire.from_record(record))
    for layer, f in filled["lora"].items():
        for k in ("A", "B"):
            want = twice if k == kept_away else tree
            np.testing.assert_array_equal(f[k], want["lora"][layer][k])


def test_run_config_errors_name_the_key():
    good = {"workdir": "/tmp/x", "round-timeout-s": 5.0, "retries": 0, "min-replies": 1,
            "connect-timeout-s": 1.0}  # fmt: skip
    assert runconfig.options(good).retries == 0
    with pytest.raises(ConfigError, match=r"^run config retries: must be a int >= 0, got -1$"):
        runconfig.options(good | {"retries": -1})
    with pytest.raises(ConfigError, match=r"^run config workdir: "):
        runconfig.options(good | {"workdir": ""})
    with pytest.raises(ConfigError, match=r"^run config experiment: not an experiment config"):
        runconfig.experiment({"experiment": "{}"})


def test_shards_hold_each_clients_rows_in_order(tmp_path):
    config = _config()
    _, arrays, _, part = experiment.load_data(config)
    paths = shards.write(config, str(tmp_path))
    for u, path in enumerate(paths):
        shard = shards.load(path)
        assert shard.client_id == u
        for k, v in arrays.items():
            np.testing.assert_array_equal(shard.train[k], v[part.train[u]])
            np.testing.assert_array_equal(shard.holdout[k], v[part.holdout[u]])
        np.testing.assert_array_equal(shard.holdout[ROW_KEY], part.holdout[u])
    with pytest.raises(ConfigError, match=r"^node config data-path: cannot read"):
        shards.load(str(tmp_path / "absent.npz"))


def test_a_generation_client_scores_its_own_held_out_problems(tmp_path, monkeypatch):
    """A GSM8K client's shard holds tokens only; its evaluator scores the problems of its
    own held-out rows (their texts read from the config's data by the shard's indices)."""
    config = config_file("gsm8k.py", **{"eval.max_local_examples": 2})
    paths = shards.write(config, str(tmp_path))
    _, _, _, part = experiment.load_data(config)
    corpus = problems.corpus("gsm8k", config, {})
    seen, judge = [], generation.judge
    monkeypatch.setattr(generation, "judge", lambda t, p, c, s: seen.append(p) or judge(t, p, c, s))
    experiment_json = config.to_json()
    job = client_app.build_job(experiment_json)
    one = jax.tree.map(lambda x: x[None], job.model.trainable)
    for u in (1, 3):
        evaluator = client_app.local_evaluator(experiment_json, paths[u], None)
        (stats,) = evaluator.local_stats(job.model.base, one, np.arange(1))
        assert int(stats["rows"]) == 2
        assert seen[-1] == [corpus.train[j].problem for j in part.holdout[u][:2]]
    assert seen[0] != seen[1]


# ----------------------------------------------------------------------------- one process


class FakeGrid:
    """Flower's ``Grid`` in one process: node ``100 + u`` holds client ``u``'s data file and
    answers with the real ``client_app.app``. ``faults[u]``: ``"dead"`` (never answers a
    train message) or a function that corrupts the values of its uploads."""

    def __init__(self, run_config, paths, faults=None):
        self.contexts = {
            100 + u: Context(run_id=1, node_id=100 + u, node_config={"data-path": p},
                             state=RecordDict(), run_config=run_config)
            for u, p in enumerate(paths)
        }  # fmt: skip
        self.faults = faults or {}
        self.uploads = {}  # client -> the values of its last upload as sent
        self.replies = []  # replies not pulled yet

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Every node answers at once; :meth:`pull_messages` hands the replies out."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's push does
            node = msg.metadata.dst_node_id
            fault = self.faults.get(node - 100) if msg.metadata.message_type == "train" else None
            if fault == "dead":
                continue
            reply = client_app.app(message=msg, context=self.contexts[node])
            if fault is not None:
                values = fault(wire.from_record(reply.content["update"]))
                content = {"update": wire.pack(values),
                           "metrics": reply.content["metrics"]}  # fmt: skip
                reply = Message(RecordDict(content), reply_to=msg)
            if "update" in reply.content:
                self.uploads[node - 100] = wire.from_record(reply.content["update"])
            self.replies.append(reply)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        out = [r for r in self.replies if r.metadata.reply_to_message_id in set(message_ids)]
        self.replies = [r for r in self.replies if r not in out]
        return out


def _run_config(config, workdir, **options):
    defaults = {"round-timeout-s": 300.0, "retries": 0, "min-replies": 1,
                "connect-timeout-s": 300.0}  # fmt: skip
    return local.run_config(config, workdir, **(defaults | options))


def _final_state(workdir, template):
    """The newest checkpoint the server wrote in ``workdir``, shaped like ``template``."""
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), 1, 2)
    state = ckpt.restore(template)
    ckpt.close()
    return state


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs), default=0.0)


def _in_process(config, num_rounds):
    run = train.build(config)
    state = run.state
    for _ in range(num_rounds):
        state, _ = run.round_fn(state)
    return run.state, state


def _report(label, rows):
    """The bytes measured on Flower's messages beside the method's ``comm_bytes`` formula."""
    for r in rows:
        print(f"{label} round {r['round']}: bytes per client measured up "
              f"{r['flower/bytes_up_per_client']:.0f} (LoRA arrays "
              f"{r['flower/lora_bytes_up_per_client']:.0f}), down "
              f"{r['flower/bytes_down_per_client']:.0f}; comm_bytes formula up "
              f"{r['server/bytes_up']:.0f}, down {r['server/bytes_down']:.0f}")  # fmt: skip


def _check_bytes(rows):
    for r in rows:  # the LoRA arrays as shipped: the formula's float32s, no more
        assert r["flower/lora_bytes_up_per_client"] == r["server/bytes_up"]
        assert r["flower/bytes_up_per_client"] > r["flower/lora_bytes_up_per_client"]


def _compare(label, config, workdir, capsys):
    """The server's final state in ``workdir`` against two in-process rounds of ``config``.

    ``config`` runs clients one at a time (``train.client_mode=loop``), as each node trains
    its one client: then the runs agree to the bit on CPU. Against vmapped clients they
    differ by float32 round-off that Adam amplifies where gradients are near zero (the
    in-process vmap and loop runs differ as much); that figure is printed, not asserted."""
    start, want = _in_process(config, 2)
    got = _final_state(str(workdir), start)
    trees = (got.lora, got.head, got.method)
    diff = _max_diff(trees, (want.lora, want.head, want.method))
    assert diff <= 1e-5
    assert int(got.bytes_up) == int(want.bytes_up) and int(got.round) == 2
    _, vmapped = _in_process(_with(config, **{"train.client_mode": "vmap"}), 2)
    vmap_diff = _max_diff(trees, (vmapped.lora, vmapped.head, vmapped.method))
    rows = _rows(str(workdir))
    _check_bytes(rows)
    with capsys.disabled():
        print(f"\n{label}: max|flower - in-process loop| = {diff:.2e}, "
              f"max|flower - in-process vmap| = {vmap_diff:.2e}")  # fmt: skip
        _report(label, rows)


def _with(config, **overrides):
    config = config.copy_and_resolve_references()
    for field, value in overrides.items():
        section, name = field.split(".")
        config[section][name] = value
    return config


def _serve(config, workdir, faults=None, **options) -> FakeGrid:
    """The ServerApp's ``main`` over a :class:`FakeGrid` of ``config``'s clients."""
    run_config = _run_config(config, str(workdir / "run"), **options)
    grid = FakeGrid(run_config, shards.write(config, str(workdir / "data")), faults)
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=run_config))  # fmt: skip
    return grid


# DP-FedAvg (server.dp): each client clips its own upload, the server adds the noise.
DP = {"privacy.clip_norm": 0.05, "privacy.noise_multiplier": 1.0}


@pytest.mark.parametrize("label, fields", [("fedit", {}), ("fedit with DP", DP)])
def test_two_rounds_through_flower_messages_equal_the_in_process_run(
    tmp_path, capsys, label, fields
):
    config = _config(**{"server.name": "fedit", "train.client_mode": "loop", **fields})
    _serve(config, tmp_path)
    _compare(f"{label} (one process)", config, tmp_path / "run", capsys)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(server.ESTIMATORS) - {"fedit"}))
def test_every_method_through_flower_messages_equals_the_in_process_run(tmp_path, name):
    """Two rounds of every other method (about 15 s each): merges, fresh adapters, frozen
    and personal factors all reach the clients as in one process."""
    config = _config(**{"server.name": name, "train.client_mode": "loop"})
    grid = _serve(config, tmp_path)
    start, want = _in_process(config, 2)
    got = _final_state(str(tmp_path / "run"), start)
    if name == "fedsa":  # B never left the clients: compare theirs; the server kept B = 0
        for u, context in enumerate(grid.contexts.values()):
            own = wire.from_record(context.state["private"])
            for layer, B in want.method["B"].items():
                np.testing.assert_allclose(own[f"lora|{layer}|B"], B[u], atol=1e-5)
        assert all(float(np.abs(f["B"]).max()) == 0 for f in got.lora.values())
        got = got._replace(lora={n: {"A": f["A"]} for n, f in got.lora.items()}, method={})
        want = want._replace(lora={n: {"A": f["A"]} for n, f in want.lora.items()}, method={})
    diff = _max_diff((got.lora, got.head, got.method), (want.lora, want.head, want.method))
    assert diff <= 1e-5


def _comparable_rows(workdir):
    """The rows of a run without what differs between identical runs (``time/*``) or exists
    over Flower only (``flower/*``: clients counted, bytes measured on the messages)."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "flower/"))}
            for r in _rows(workdir)]  # fmt: skip


# What an in-process server computes from leaves that never reach a Flower server: FedSA's
# personal B stays on its client, so over Flower the server's aggregation error of B A is 0.
UNSEEN = {"fedit": set(), "fedsa": {f"server/rho{k}" for k in ("", "_rel", "_svd", "_svd_rel")}}


@pytest.mark.parametrize("name", ["fedit", pytest.param("fedsa", marks=pytest.mark.slow)])
def test_a_run_through_flower_writes_the_rows_of_the_in_process_run(tmp_path, capsys, name):
    """One config both ways, clients one at a time (``train.client_mode=loop``) on packed
    rows: the same metrics rows, training and evaluation (the global model before round 1
    on validation and on every client's held-out rows; after each round, each client's own
    model on its held-out rows, FedSA's personal ``B`` included), within 1e-5, but for the
    server's figures of FedSA's ``B``, which never reaches it (:data:`UNSEEN`). FedIT's
    Flower run stops after round 1 and resumes from its checkpoint, as ``train.run`` does;
    FedSA's cannot (its clients' ``B`` lives in one Flower run's node state) and says so; a
    changed config is refused on the same workdir, as in process."""
    fields = {"server.name": name, "train.client_mode": "loop", "eval.at_start": True,
              "data.packing": True}  # fmt: skip
    config = _config(**fields)
    train.run(config, str(tmp_path / "in_process"))
    if name == "fedit":
        _serve(_with(config, **{"train.num_rounds": 1}), tmp_path)
    _serve(config, tmp_path)  # fedit: resumes round 1's checkpoint
    want, got = _comparable_rows(tmp_path / "in_process"), _comparable_rows(tmp_path / "run")
    assert [r["round"] for r in got] == [r["round"] for r in want] == [0, 1, 2]
    worst, differ = (0.0, ""), set()
    for w, g in zip(want, got, strict=True):
        assert set(g) == set(w), set(g) ^ set(w)
        for k in w:  # float32 training, float64 sums: bit-equal on CPU, 1e-5 elsewhere
            if g[k] != pytest.approx(w[k], abs=1e-5, rel=1e-5):
                differ.add(k)
            elif k not in UNSEEN[name]:
                worst = max(worst, (abs(g[k] - w[k]), f"{k} of round {w['round']}"))
    assert differ <= UNSEEN[name], differ
    assert {"eval/local/accuracy", "eval/global/accuracy"} <= set(got[2])
    summary = (tmp_path / "run" / reporting.SUMMARY_FILE).read_text()
    assert "| global accuracy before round 1" in summary and "flower" not in summary
    with capsys.disabled():
        print(
            f"\n{name}: {len(want)} rows, {sum(map(len, want))} fields, "
            f"max|flower - in-process| = {worst[0]:.2e} ({worst[1]})"
        )
    changed = _with(config, **{"client.learning_rate": 0.5})
    with pytest.raises(ConfigError, match=r"^config field client.learning_rate: "):
        _serve(changed, tmp_path)
    if name == "fedsa":
        with pytest.raises(ConfigError, match=r"cannot resume fedsa over Flower: .* lora\|"):
            _serve(_with(config, **{"train.num_rounds": 3}), tmp_path)


def test_a_federation_without_a_global_split_says_so(tmp_path):
    """``eval.global_split=False``: the server evaluates no global model; the clients'
    statistics still give the local metric, and the summary says why there is no global
    one."""
    config = _config(**{"server.name": "fedit", "train.num_rounds": 1,
                        "eval.global_split": False})  # fmt: skip
    _serve(config, tmp_path)
    (row,) = _rows(str(tmp_path / "run"))
    assert "eval/local/accuracy" in row
    assert not [k for k in row if k.startswith(("eval/global", "eval/gap"))]
    line = next(x for x in (tmp_path / "run" / reporting.SUMMARY_FILE).read_text().splitlines()
                if x.startswith("| global accuracy "))  # fmt: skip
    assert line.split("|")[2].strip() == reporting.NO_GLOBAL_SPLIT


def _nan_B(values):
    key = next(k for k in sorted(values) if k.endswith("|B"))
    return values | {key: np.full_like(values[key], np.nan)}


def _rank_up(values):
    key = next(k for k in sorted(values) if k.endswith("|A"))
    return values | {key: np.concatenate([values[key], values[key][:1]])}


class SlowGrid:
    """Replies to messages ``0..n-1``: reply ``i`` is there ``delays[i]`` s after the push
    (``None``: never)."""

    def __init__(self, delays):
        self.delays, self.t0 = delays, None

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        return [str(i) for i in range(len(list(messages)))]

    def pull_messages(self, ids):
        now = time.monotonic() - self.t0
        ready = [i for i in ids if (d := self.delays[int(i)]) is not None and d <= now]
        return [Message(RecordDict({}), reply_to=_stamped(i)) for i in ready]


def _stamped(message_id: str) -> Message:
    msg = Message(RecordDict({}), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = message_id
    return msg


def test_exchange_returns_once_every_reply_is_there_and_stops_at_the_timeout():
    t0 = time.monotonic()
    assert len(flower_transport.exchange(SlowGrid([0.0, 0.3]), [None, None], 60.0)) == 2
    assert time.monotonic() - t0 < 0.3 + 5 * flower_transport.POLL_S
    t0 = time.monotonic()
    assert len(flower_transport.exchange(SlowGrid([0.0, None]), [None, None], 0.5)) == 1
    assert 0.5 <= time.monotonic() - t0 < 1.5


def test_faults_leave_the_round_to_the_clients_that_answered(tmp_path, caplog):
    """Of four clients one uploads NaN, one another rank, one never answers: the round
    aggregates the fourth alone (its weight renormalized to 1) and logs why."""
    config = smoke_config(**{"server.name": "fedit", "train.num_rounds": 1,
                             "train.clients_per_round": 4, "ckpt.every_rounds": 1})  # fmt: skip
    faults = {1: _nan_B, 2: _rank_up, 3: "dead"}
    with caplog.at_level("INFO", logger="flwr"):
        grid = _serve(config, tmp_path, faults, retries=1, **{"round-timeout-s": 1.0})
    log = caplog.text
    assert re.search(r"round 1: client 1 rejected: lora\|.*\|B has non-finite values", log)
    assert re.search(r"round 1: client 2 rejected: .*\(rank 5, expected 4\)", log)
    assert "round 1: no reply from clients [3] (attempt 2 of 2)" in log
    assert "round 1: aggregating clients [0] of [0, 1, 2, 3], weights renormalized" in log
    (row,) = _rows(str(tmp_path / "run"))
    assert (row["flower/clients_aggregated"], row["flower/clients_rejected"],
            row["flower/clients_missing"]) == (1, 2, 1)  # fmt: skip
    template = train.build(config).state
    state = _final_state(str(tmp_path / "run"), template)
    alone = wire.fill({"lora": state.lora, "head": state.head}, grid.uploads[0])
    # FedIT over one client with weight 1 is that client's upload.
    chex.assert_trees_all_close({"lora": state.lora, "head": state.head}, alone, atol=1e-7)


def test_too_few_accepted_uploads_stop_the_run(tmp_path):
    config = smoke_config(**{"server.name": "fedit", "train.num_rounds": 1,
                             "train.clients_per_round": 4})  # fmt: skip
    with pytest.raises(ValueError, match=r"^round 1: 1 accepted uploads .*min-replies=2$"):
        _serve(config, tmp_path, {u: "dead" for u in (1, 2, 3)},
               **{"min-replies": 2, "round-timeout-s": 1.0})  # fmt: skip


# ----------------------------------------------------------------------------- deployment


def test_free_ports_are_distinct_and_bindable():
    ports = local.free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_all_kills_children_that_ignore_sigterm(tmp_path):
    """A leader whose child ignores SIGTERM: after the grace both are gone."""
    pid_file = tmp_path / "child.pid"
    script = f"trap '' TERM; sleep 60 & echo $! > {pid_file}; wait"
    leader = local._spawn(["bash", "-c", script], tmp_path / "log", os.environ.copy())
    while not pid_file.exists() or not pid_file.read_text().strip():
        time.sleep(0.05)
    child = int(pid_file.read_text())
    t0 = time.monotonic()
    local.stop_all([leader], grace_s=0.5)
    assert time.monotonic() - t0 < 3
    assert leader.poll() is not None and not _alive(child)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A SuperLink and three SuperNodes as separate processes (insecure, localhost), each
    node with its own client's data file."""
    workdir = tmp_path_factory.mktemp("federation")
    paths = shards.write(_config(), str(workdir / "data"))
    with local.federation(workdir, paths, None, None, XLA_CACHE) as fed:
        yield fed, workdir


def _submit(fed, workdir, name, config, **options):
    log = fed.logs / f"{name}.log"
    return local.submit(fed, _run_config(config, str(workdir / name), **options), log), log


def test_flower_programs_are_found_beside_python_without_path(tmp_path, monkeypatch):
    """A virtual environment that is not activated: PATH lacks its bin folder, and the
    SuperLink still starts from the folder of the Python that runs the launcher."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with local.federation(tmp_path, [], None, None, XLA_CACHE) as fed:
        assert fed.superlink.poll() is None
    assert fed.env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedit", "floranna"])
def test_deployed_rounds_equal_the_in_process_run(deployed, name, capsys):
    fed, workdir = deployed
    config = _config(**{"server.name": name, "train.client_mode": "loop"})
    run, log = _submit(fed, workdir, name, config)
    run.wait(timeout=900)
    status = local.run_status(fed, log)
    assert status["status"] == "finished:completed", log.read_text()[-4000:]
    _compare(f"{name} (deployment runtime)", config, workdir / name, capsys)
    with capsys.disabled():
        print(f"{name}: SuperLink network traffic of the run {status['network-traffic']}")


@pytest.mark.slow
def test_a_killed_supernode_leaves_the_round_to_the_others(deployed):
    """Node 2 is killed (SIGKILL, with its ClientApp) once it has its round-1 message; both
    rounds complete with clients 0 and 1, weights renormalized, and the server says so."""
    fed, workdir = deployed
    node_log = fed.logs / "node_2.log"
    received = node_log.read_text().count("Receiving: train message")
    config = _config(**{"server.name": "fedit"})
    run, log = _submit(fed, workdir, "killed", config, **{"round-timeout-s": 60.0})
    deadline = time.monotonic() + 600
    while node_log.read_text().count("Receiving: train message") == received:
        assert time.monotonic() < deadline and run.poll() is None, log.read_text()[-4000:]
        time.sleep(0.5)
    local.stop(fed.nodes[2], signal.SIGKILL)
    run.wait(timeout=900)
    status = local.run_status(fed, log)
    assert status["status"] == "finished:completed", log.read_text()[-4000:]
    rows = _rows(str(workdir / "killed"))
    assert [(r["flower/clients_aggregated"], r["flower/clients_missing"]) for r in rows] == [
        (2, 1), (2, 1)]  # fmt: skip
    text = log.read_text()
    assert "round 1: aggregating clients [0, 1] of [0, 1, 2], weights renormalized" in text
    assert "round 2: aggregating clients [0, 1] of [0, 1, 2], weights renormalized" in text


@pytest.mark.slow
def test_ctrl_c_stops_every_process_within_5_s_with_one_line(tmp_path):
    """``flower.local`` mid-run gets SIGINT (Ctrl-C): within 5 s every process it started
    (SuperLink, SuperNodes, warm executors, ``flwr run`` and their children) is gone, and
    it says so in one line, without a traceback."""
    psutil = pytest.importorskip("psutil")
    args = [sys.executable, "-m", "floranna_jax.flower.local", "--config=configs/glue.py:smoke",
            f"--workdir={tmp_path}", "--insecure", "--config.partition.num_clients=2",
            "--config.train.clients_per_round=2", "--config.train.num_rounds=50"]  # fmt: skip
    with open(tmp_path / "stderr", "w") as err:  # a file: a full pipe would block it
        launcher = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while "Receiving: train message" not in _read(tmp_path / "logs" / "node_0.log"):
        assert time.monotonic() < deadline and launcher.poll() is None, _read(tmp_path / "stderr")
        time.sleep(0.5)
    children = psutil.Process(launcher.pid).children(recursive=True)
    assert len(children) >= 6  # SuperLink, 2 SuperNodes, 2 executors, flwr run
    t0 = time.monotonic()
    launcher.send_signal(signal.SIGINT)
    while any(_alive(c.pid) for c in children) or launcher.poll() is None:
        assert time.monotonic() - t0 < 5, [_cmdline(c) for c in children if _alive(c.pid)]
        time.sleep(0.05)
    print(f"Ctrl-C: every process gone in {time.monotonic() - t0:.2f} s")
    err = _read(tmp_path / "stderr")
    assert launcher.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: stopped the SuperLink")


def _cmdline(process) -> str:
    with contextlib.suppress(Exception):
        return " ".join(process.cmdline())
    return str(process.pid)


def _read(path: pathlib.Path) -> str:
    return path.read_text() if path.exists() else ""
