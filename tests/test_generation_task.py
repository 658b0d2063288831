"""Tests of the generation-scored tasks (floranna_jax/tasks/generation.py, data/completion.py):
both smoke configs run end to end through launch.py and report the generation and answer-loss
metrics, a resumed smoke run is bit-exact, prompts and loss masks are built right on real GSM8K and
MBPP rows (with SmolLM2's chat template where its GGUF is at hand), the evaluator's exact
match is the hand-scored one of per-prompt greedy generations, and bad inputs are one line."""

import json

import jax
import numpy as np
import pytest
from smoke_setup import NO_BAR, config_file, launch, shared_compilation

from floranna_jax import checkpoint, config_check, keys, models, reporting, tasks, train
from floranna_jax.data import code, completion, gsm8k
from floranna_jax.errors import ConfigError
from floranna_jax.models import decoder
from floranna_jax.tasks import generation, problems


@pytest.fixture(autouse=True, scope="module")
def _shared_compilation():
    with shared_compilation():
        yield


def _rows(workdir):
    return [
        {k: v for k, v in r.items() if not k.startswith("time/")}
        for r in reporting.read_rows(workdir / reporting.METRICS_FILE)
    ]


def _launched(config: str, workdir) -> None:
    """``python launch.py --config=<config> --workdir=<workdir>``, as the README runs it but
    without the per-step bar (so the tests' compilation cache keeps every program)."""
    proc = launch(NO_BAR, config=config, workdir=workdir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def gsm8k_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gsm8k_smoke")
    _launched("configs/gsm8k.py:smoke", workdir)
    return workdir


def test_gsm8k_smoke_reports_generation_metrics(gsm8k_run):
    rows = _rows(gsm8k_run)
    assert [r["round"] for r in rows] == [1, 2]
    for where in ("global", "local"):
        for metric in ("exact_match_strict", "exact_match_flexible", "answer_loss"):
            assert np.isfinite(rows[-1][f"eval/{where}/{metric}"]), (where, metric)
    assert 0.0 < rows[-1]["eval/global/answer_loss"] < rows[0]["eval/global/answer_loss"] + 1.0
    summary = (gsm8k_run / reporting.SUMMARY_FILE).read_text()
    assert "gsm8k" in summary
    loss = rows[-1]["eval/global/answer_loss"]
    assert "| global answer_loss" in summary and reporting.format_value(loss) in summary


def test_smoke_run_writes_generations(gsm8k_run):
    config = config_file("gsm8k.py")
    tested = [i.problem for i in problems.corpus("gsm8k", config, {}).tests[""]]
    keep = min(config.eval.log_generations, len(tested))
    for r in (1, 2):
        lines = (gsm8k_run / "generations" / f"round_{r}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == keep == 8  # all 8 synthetic test problems (fewer than 16)
        for k, rec in enumerate(records):
            assert rec["set"] == "gsm8k" and rec["index"] == k
            assert tested[k].question in rec["prompt"]
            assert rec["gold"] == gsm8k.reference(tested[k].answer)
            assert rec["extracted"] == gsm8k.extract_flexible(rec["output"])
            assert rec["correct"] == (rec["extracted"] == rec["gold"])
            assert "Question:" not in rec["output"]  # cut at the stop string
        row = _rows(gsm8k_run)[r - 1]  # all problems logged: their mean is the metric
        assert (
            np.mean([rec["correct"] for rec in records]) == row["eval/global/exact_match_flexible"]
        )


def test_code_smoke_reports_pass_at_1_on_both_test_sets(tmp_path):
    _launched("configs/code.py:smoke", tmp_path)
    last = _rows(tmp_path)[-1]
    for metric in ("pass@1", "answer_loss", "humaneval_pass@1", "humaneval_answer_loss"):
        assert 0.0 <= last[f"eval/global/{metric}"] < 100.0, metric
    assert "eval/local/pass@1" in last and "eval/local/humaneval_pass@1" not in last


def test_resumed_smoke_run_is_bit_exact(gsm8k_run, tmp_path):
    train.run(config_file("gsm8k.py", **{"train.num_rounds": 1}), str(tmp_path))
    train.run(config_file("gsm8k.py"), str(tmp_path))  # a fresh call resumes at round 1
    assert _rows(tmp_path) == _rows(gsm8k_run)
    config = config_file("gsm8k.py")
    states = []
    for workdir in (gsm8k_run, tmp_path):
        ckpt = checkpoint.Checkpointer(workdir / "checkpoints", 1, 2)
        states.append(ckpt.restore(train.build(config).state))
        ckpt.close()
    a, b = states
    assert int(a.round) == int(b.round) == 2
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit-exact


# ----------------------------------------------------------------------------- prompts


def _check_row(arrays, i, prompt, target):
    """Row i holds prompt + target, and the loss mask is 1 exactly on the target."""
    n = int(arrays["attention_mask"][i].sum())
    ids, loss = arrays["input_ids"][i, :n], arrays["loss_mask"][i, :n]
    assert list(ids) == [*prompt, *target][:n]
    assert list(ids[loss == 1]) == list(target)
    assert loss[: len(prompt)].sum() == 0 and arrays["loss_mask"][i, n:].sum() == 0


def test_real_gsm8k_and_mbpp_rows_with_the_byte_tokenizer(gsm8k_dir, mbpp_dir):
    codec = completion.byte_codec()
    rows = gsm8k.read("test", data_dir=gsm8k_dir)[:3]
    rows += code.read_mbpp("train", data_dir=mbpp_dir)[:3]
    items = problems._items(rows, codec, "plain")
    arrays = problems.item_arrays(items, completion.row_length(
        [len(i.prompt) + len(i.target) for i in items], 4096), 4096)  # fmt: skip
    for i, item in enumerate(items):
        _check_row(arrays, i, item.prompt, item.target)
        text = codec.decode(item.target)
        assert item.target[-1] == codec.eos_id and item.prompt[0] == completion.BYTE_BOS
        if i < 3:
            assert "<<" not in text and text.endswith(f"#### {gsm8k.reference(rows[i].answer)}")
            assert rows[i].question in codec.decode(item.prompt)
        else:
            assert text.startswith("```python\n") and rows[i].solution.strip() in text
            assert all(t in codec.decode(item.prompt) for t in rows[i].test_list)


def test_truncation_keeps_the_first_tokens():
    arrays = completion.arrays([[1, 2, 3]], [[4, 5, 6, 7]], max_length=5)
    assert arrays["input_ids"].shape == (1, 5)
    assert list(arrays["input_ids"][0]) == [1, 2, 3, 4, 5]
    assert list(arrays["loss_mask"][0]) == [0, 0, 0, 1, 1]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm_gguf, tmp_path_factory):
    """The tokenizer files convert_gguf writes for SmolLM2 (not the weights: seconds)."""
    gguf = pytest.importorskip("gguf", reason="converting needs the gguf package (extra: convert)")
    from floranna_jax import convert_gguf, gguf_tokenizer
    from floranna_jax.data import glue

    reader = convert_gguf._open(gguf, smollm_gguf)
    meta = convert_gguf._Meta(reader)
    config = convert_gguf.hf_config(meta, {t.name for t in reader.tensors})
    tokenizer, tokenizer_config, special_map = gguf_tokenizer.build_tokenizer(meta, config)
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    convert_gguf._write_json(folder / "tokenizer_config.json", tokenizer_config)
    convert_gguf._write_json(folder / "special_tokens_map.json", special_map)
    return glue.load_tokenizer(folder)


def test_chat_template_with_the_smollm2_tokenizer(smollm2_tokenizer, gsm8k_dir):
    codec = completion.hf_codec(smollm2_tokenizer)
    assert completion.resolve_format(codec, "auto") == "chat"
    problem = gsm8k.read("test", data_dir=gsm8k_dir)[0]
    items = problems._items([problem], codec, "chat")
    prompt = smollm2_tokenizer.decode(items[0].prompt)
    assert "<|im_start|>user\n" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert problem.question in prompt
    assert items[0].target[-1] == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    arrays = problems.item_arrays(items, 512, 512)
    _check_row(arrays, 0, items[0].prompt, items[0].target)
    assert codec.decode(items[0].target) == gsm8k.target(problem.answer)
    plain = problems._items([problem], codec, "plain")[0].prompt
    assert "<|im_start|>" not in smollm2_tokenizer.decode(plain)


def test_chat_without_a_template_is_an_error():
    with pytest.raises(ValueError, match="chat template"):
        completion.resolve_format(completion.byte_codec(), "chat")
    assert completion.resolve_format(completion.byte_codec(), "auto") == "plain"


# ----------------------------------------------------------------------------- evaluation


def test_stop_strings_cut_generation_and_scoring(monkeypatch):
    config = config_file("gsm8k.py", **{"data.num_eval_examples": 2})
    task = tasks.get("gsm8k")
    train_arrays, validation = task.load(config)
    corpus = problems.corpus("gsm8k", config, {})
    codec, answers = corpus.codec, [gsm8k.reference(i.problem.answer) for i in corpus.tests[""]]
    # Each row answers right, then invents a next problem with another answer, as base
    # models do; unstopped, the flexible (last-number) match would score the invented one.
    texts = [f"so #### {a}\n\nQuestion: What is 1 + 1?\nAnswer: #### 2" for a in answers]
    calls = []

    def fake_generate(model, base, adapters, ids, mask, *, stop_ids, **kw):
        calls.append(stop_ids)
        out = np.full((len(ids), 64), codec.pad_id, np.int32)
        for row, text in enumerate(texts):
            out[row, : len(text)] = codec.encode(text)
        return out

    monkeypatch.setattr(decoder, "generate", fake_generate)
    spec = models.LoraSpec(rank=4, alpha=8.0)
    model = models.build_random(models.tiny_config("llama"), 0, spec, keys.model_key(0))
    evaluator = task.make_evaluator(model, train_arrays, validation, [], config)
    records = []
    got = evaluator.global_eval(model.base, model.trainable, record=records.extend)
    assert calls == [completion.stop_sequences(codec, config.eval.stop)]
    assert codec.encode("Question:") in calls[0]
    assert got["exact_match_flexible"] == got["exact_match_strict"] == 1.0
    assert [r["output"] for r in records] == [f"so #### {a}\n\n" for a in answers]
    config.eval.stop = ()  # without stops the invented answer is scored
    evaluator = task.make_evaluator(model, train_arrays, validation, [], config)
    assert evaluator.global_eval(model.base, model.trainable)["exact_match_flexible"] == 0.0


def test_stop_sequences_match_mid_text():
    codec = completion.byte_codec()
    assert completion.stop_sequences(codec, ["Q:"]) == [codec.encode("Q:")]
    assert completion.cut_at("a Q: b Q:", ["b", "Q:"]) == "a "
    assert completion.cut_at("no stop", ["Q:"]) == "no stop"


def test_stop_sequences_with_the_smollm2_tokenizer(smollm2_tokenizer):
    codec = completion.hf_codec(smollm2_tokenizer)
    stops = completion.stop_sequences(codec, ["Question:"])
    for text in ("#### 7\n\nQuestion: x", "#### 7 Question: x", "#### 7\nQuestion: x"):
        ids = codec.encode(text)
        end = next(n for n in range(len(ids) + 1) if "Question:" in codec.decode(ids[:n]))
        # The decoder stops right after the token that completes "Question:".
        assert any(ids[end - len(s) : end] == s for s in stops), (text, ids, stops)


def test_short_batches_are_padded_to_a_power_of_two(monkeypatch):
    assert [generation.bucket(n, 16) for n in (1, 2, 3, 5, 9, 16, 40)] == [1, 2, 4, 8, 16, 16, 16]
    assert generation.calls(21, 8) == [(0, 8), (8, 8), (16, 8)]
    assert generation.calls(19, 8) == [(0, 8), (8, 8), (16, 4)]
    config = config_file("gsm8k.py", **{"eval.batch_size": 16, "eval.max_local_examples": 2,
                                        "data.num_eval_examples": 5})  # fmt: skip
    rows = []

    def fake_generate(model, base, adapters, ids, mask, **kw):
        rows.append(len(ids))
        return np.full((len(ids), kw["max_new_tokens"]), kw["pad_id"], np.int32)

    monkeypatch.setattr(decoder, "generate", fake_generate)
    task = tasks.get("gsm8k")
    train_arrays, validation = task.load(config)
    spec = models.LoraSpec(rank=4, alpha=8.0)
    model = models.build_random(models.tiny_config("llama"), 0, spec, keys.model_key(0))
    holdout = [np.arange(4), np.arange(4, 9)]
    evaluator = task.make_evaluator(model, train_arrays, validation, holdout, config)
    evaluator.global_eval(model.base, model.trainable)
    assert rows == [8]  # 5 test problems
    trainable = jax.tree.map(lambda x: np.stack([x, x]), model.trainable)
    evaluator.local_eval(model.base, trainable, np.array([0, 1]))
    assert rows == [8, 2, 2]  # 2 held-out rows per client, not 16


def test_global_exact_match_is_the_hand_scored_one(monkeypatch):
    config = config_file("gsm8k.py", **{"eval.batch_size": 3, "data.num_eval_examples": 5})
    task = tasks.get("gsm8k")
    train_arrays, validation = task.load(config)
    spec = models.LoraSpec(rank=4, alpha=8.0)
    model = models.build_random(models.tiny_config("llama"), 0, spec, keys.model_key(0))
    # Non-zero adapters, so the LoRA path of generation is exercised.
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape),
                        model.trainable["lora"])  # fmt: skip
    trainable = {"lora": lora, "head": {}}
    seen = []
    judge = generation.judge
    monkeypatch.setattr(generation, "judge", lambda t, p, c, s: seen.append(c) or judge(t, p, c, s))
    evaluator = task.make_evaluator(model, train_arrays, validation, [], config)
    got = evaluator.global_eval(model.base, trainable)

    corpus = problems.corpus("gsm8k", config, {})
    codec, by_hand = corpus.codec, []
    for item in corpus.tests[""]:  # one prompt at a time, no padding
        ids = np.asarray([item.prompt], np.int32)
        new = decoder.generate(model, model.base, lora, ids, np.ones_like(ids),
                               max_new_tokens=config.eval.max_new_tokens,
                               eos_ids=(codec.eos_id,), pad_id=codec.pad_id)  # fmt: skip
        by_hand.append(codec.decode(completion.until_eos(np.asarray(new[0]), codec.eos_id)))
    assert seen == [by_hand]
    want = gsm8k.score(by_hand, [i.problem.answer for i in corpus.tests[""]])
    for k, v in want.items():
        assert got[k] == v, k
    assert len(by_hand) == 5 and got["answer_loss"] > 0


def test_generation_scores_count_right_answers():
    problems = [gsm8k.Problem("q", "#### 7"), gsm8k.Problem("q", "#### 12")]
    got = generation.judge("gsm8k", problems, ["so #### 7", "it is 12"], 1.0)
    assert got.metrics == {"exact_match_strict": 0.5, "exact_match_flexible": 1.0}
    assert got.extracted == ["7", "12"] and got.gold == ["7", "12"] and got.correct == [True] * 2


@pytest.mark.parametrize("name", ["gsm8k", "code"])
def test_clients_counts_merge_into_the_in_process_local_metric(monkeypatch, name):
    """Federated evaluation: each client's counts (right answers, rows, answer NLL and
    tokens), from an evaluator of its own rows alone as a Flower client builds it, combine
    into the in-process local metric, which is the mean of each client's rows scored as a
    test set. Decoding is faked to give the reference answer to every other problem, so
    the counts differ between clients; the answer loss is the tiny model's own."""
    config = config_file(f"{name}.py", **{"eval.max_local_examples": 3,
                                         "eval.code_allow_weak_sandbox": True})  # fmt: skip
    task = tasks.get(name)
    train_arrays, validation = task.load(config)
    corpus = problems.corpus(name, config, {})
    codec, right = corpus.codec, {}
    for j, item in enumerate(corpus.train):
        answer = problems.texts(item.problem)[1] if j % 2 == 0 else "no idea"
        right[tuple(item.prompt)] = codec.encode(answer) + [codec.eos_id]

    def fake_generate(model, base, adapters, ids, mask, **kw):
        out = np.full((len(ids), 512), codec.pad_id, np.int32)
        for row, (i, m) in enumerate(zip(np.asarray(ids), np.asarray(mask), strict=True)):
            text = right.get(tuple(i[m == 1].tolist()), [codec.eos_id])
            out[row, : len(text)] = text
        return out

    monkeypatch.setattr(decoder, "generate", fake_generate)
    spec = models.LoraSpec(rank=4, alpha=8.0)
    model = models.build_random(models.tiny_config("llama"), 0, spec, keys.model_key(0))
    holdout = [np.arange(0, 5), np.arange(5, 7), np.arange(8, 9)]  # 3 (capped), 2 and 1 rows
    trainable_U = jax.tree.map(lambda x: np.stack([x] * 3), model.trainable)
    ids = np.arange(3)
    want = task.make_evaluator(model, train_arrays, None, holdout, config).local_eval(
        model.base, trainable_U, ids)  # fmt: skip
    stats = []
    for u in ids:  # each client alone
        alone = task.make_evaluator(model, train_arrays, None, [holdout[u]], config)
        one = jax.tree.map(lambda x: x[:1], trainable_U)
        stats += alone.local_stats(model.base, one, np.arange(1))
    assert [int(s["rows"]) for s in stats] == [3, 2, 1]
    got = alone.combine(stats)
    by_set = []  # each client's rows scored as a test set: the scores of those rows
    for h in holdout:
        items = [corpus.train[j] for j in h[:3]]
        scorer = generation.evaluator(name, model, corpus._replace(tests={"": items}), [], config)
        by_set.append(scorer.global_eval(model.base, model.trainable))
    main = generation.MAIN_METRIC[name]
    assert 0 < want[main] < 1  # some answers right, not all
    assert set(got) == set(want) == set(by_set[0]) and "answer_loss" in got
    for k in want:  # the same divisions of the same counts: to the bit
        assert got[k] == want[k] == float(np.mean([b[k] for b in by_set])), k


# ----------------------------------------------------------------------------- bad inputs


BAD = [
    ("configs/gsm8k.py:smoke", ["--config.partition.scheme=dirichlet"],
     ["partition.scheme", "'dirichlet'", "iid"]),
    ("configs/code.py:smoke", ["--config.data.prompt=fancy"], ["data.prompt", "'fancy'", "chat"]),
    ("configs/gsm8k.py:smoke", ["--config.data.prompt=chat"], ["data.prompt", "chat template"]),
    ("configs/gsm8k.py:smoke", ["--config.data.source=local", "--config.data.dir=/nowhere/data"],
     ["data.dir", "/nowhere/data"]),
    ("configs/code.py:smoke", ["--config.data.source=local"], ["data.dir", "is empty"]),
    ("configs/gsm8k.py:smoke", ["--config.eval.stop=('Question:', '')"],
     ["eval.stop", "non-empty strings"]),
    ("configs/gsm8k.py:smoke", ["--config.eval.log_generations=-1"],
     ["eval.log_generations", "-1"]),
]  # fmt: skip


@pytest.mark.parametrize("config, args, words", BAD, ids=[" ".join(b[1]) for b in BAD])
def test_bad_input_is_one_line(config, args, words, tmp_path):
    proc = launch(*args, config=config, workdir=tmp_path / "run")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: config field")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "run").exists()


def test_missing_data_files_name_the_folder(tmp_path):
    config = config_file("gsm8k.py", **{"data.source": "local", "data.dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"^config field data.dir: GSM8K split .*\.jsonl"):
        tasks.get("gsm8k").load(config)


@pytest.mark.parametrize("name", ["gsm8k.py", "code.py"])
def test_reference_defaults_validate(name):
    config = config_file(name, "")
    assert config.model.path == "meta-llama/Llama-2-7b-hf" and config.lora.rank == 16
    assert tuple(config.lora.targets) == ("q_proj", "v_proj") and config.partition.scheme == "iid"
    config_check.validate(config)  # a hub id is not a local path: valid without network
