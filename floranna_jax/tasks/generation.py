"""Generation-scored tasks for decoders: GSM8K math ("gsm8k") and code ("code": train on
MBPP, evaluate on MBPP test and HumanEval).

Data (``load``; read and tokenized by :mod:`floranna_jax.tasks.problems`): ``data.source``
is ``"local"`` (``data.dir``, the layout of shared/data), ``"hub"`` or ``"synthetic"`` (tiny
problems in the same formats,
:mod:`floranna_jax.data.synthetic_text`: ``data.num_train_examples`` training rows,
``data.num_eval_examples`` test rows). ``data.tokenizer`` is ``"model"`` (the model folder's
own, transformers AutoTokenizer) or ``"bytes"`` (built in, for the tiny random model);
``data.prompt`` is ``"auto"``, ``"chat"`` or ``"plain"`` (:mod:`floranna_jax.data.completion`).
Training rows: ``input_ids``, ``attention_mask``, ``loss_mask`` int32 ``[N, L]``, the loss on
the target and its eos only; no ``"label"``, so only the iid and quantity partitions apply.
The texts (questions, references, problems) stay in this task, keyed by the data fields of
the config; the arrays hold tokens only. Federated evaluation: a client's sufficient
statistics are its rows, its right answers per score and its answers' summed NLL and tokens.

Targets: GSM8K: the worked answer without calculator annotations, ending "#### N"
(``gsm8k.target``). Code: the reference solution in a fenced python block.

Loss: the mean NLL per completion token over the real examples of a batch.

Evaluation (global: the global model on each test set, at most ``eval.max_examples``
problems; local: each sampled client's own model on its held-out training rows, at most
``eval.max_local_examples``): greedy generation of ``eval.max_new_tokens`` tokens after
prompts LEFT-padded to one length for the run (the longest prompt rounded up to 16), in
batches of ``eval.batch_size``; a set's last, shorter batch is padded only to the next power
of two (:func:`bucket`), so decoding compiles for a few sizes and does little padding work.
A row ends at eos or at one of the stop strings ``eval.stop`` (GSM8K: lm-evaluation-harness's
``until``, configs/gsm8k.py), and the scorer sees only the text before the stop. Scores: GSM8K
``exact_match_strict`` and ``exact_match_flexible``; code ``pass@1`` (programs run in
:mod:`floranna_jax.sandbox`, ``eval.code_timeout_s`` CPU seconds each; where the kernel
refuses the sandbox's namespaces the task refuses to start unless
``eval.code_allow_weak_sandbox``), and for the global model also
``humaneval_pass@1``. Every set also reports ``answer_loss`` (``humaneval_answer_loss``):
the teacher-forced NLL per token of the reference answers, which moves before exact match
does. The global evaluation hands the first ``eval.log_generations`` generations of each
test set to its ``record`` callback (the run writes them to
``generations/round_<k>.jsonl``). Evaluation shows a progress bar of its batches.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from floranna_jax import progress, sandbox
from floranna_jax.data import code, completion, gsm8k
from floranna_jax.errors import BadValue, ConfigError
from floranna_jax.models import decoder
from floranna_jax.tasks.problems import Corpus, Item, corpus, item_arrays
from floranna_jax.tasks.task import ROW_KEY, Arrays, Evaluator, Program, Task

NAMES = ("gsm8k", "code")
ALIASES = {"gsm8k": "gsm8k", "code": "code", "mbpp": "code"}
SOURCES = ("local", "hub", "synthetic")
TOKENIZERS = ("model", "bytes")
MAIN_METRIC = {"gsm8k": "exact_match_flexible", "code": "pass@1"}
STAT_SUMS = ("rows", "answer_nll", "answer_tokens")  # a client's stats that are not counts


def knows(name: str) -> bool:
    return name.lower() in ALIASES


def make(name: str) -> Task:
    """The task ``name``: "gsm8k", or "code" (alias "mbpp")."""
    task = ALIASES[name.lower()]
    cache: dict = {}  # the texts stay here, out of the arrays

    def load(config) -> tuple[Arrays, Arrays]:
        """(train, validation): token rows of the training items and of the main test set."""
        c = corpus(task, config, cache)
        m = config.data.max_length
        return item_arrays(c.train, c.length, m), item_arrays(c.tests[""], c.length, m)

    def make_evaluator(model, train, validation, holdout_index, config, rows=None) -> Evaluator:
        if ROW_KEY in train:  # rows of the training split (a client's shard): their items
            holdout_index = [np.asarray(train[ROW_KEY])[h] for h in holdout_index]
        return evaluator(task, model, corpus(task, config, cache), holdout_index, config)

    return Task(task, MAIN_METRIC[task], 0, load, loss_fn, make_evaluator, check,
                loss_metric="answer_loss")  # fmt: skip


def check(config) -> None:
    """Raise :class:`BadValue` (param: ``section.field``) for a bad field this task reads."""
    d, e = config.data, config.eval
    for field, value, valid in (("data.source", d.source, SOURCES),
                                ("data.tokenizer", d.tokenizer, TOKENIZERS),
                                ("data.prompt", d.prompt, completion.FORMATS)):  # fmt: skip
        if value not in valid:
            raise BadValue(field, f"unknown value {value!r}; valid: {', '.join(valid)}")
    for field, value, low in (("data.max_length", d.max_length, 2),
                              ("data.num_train_examples", d.num_train_examples, 1),
                              ("data.num_eval_examples", d.num_eval_examples, 1),
                              ("data.max_train_examples", d.max_train_examples, 0),
                              ("eval.max_examples", e.max_examples, 0),
                              ("eval.max_new_tokens", e.max_new_tokens, 1),
                              ("eval.log_generations", e.log_generations, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BadValue(field, f"must be an integer >= {low}, got {value!r}")
    if not isinstance(e.stop, list | tuple) or not all(isinstance(x, str) and x for x in e.stop):
        raise BadValue("eval.stop", f"must be a list of non-empty strings, got {e.stop!r}")
    if not (isinstance(e.code_timeout_s, int | float) and e.code_timeout_s > 0):
        raise BadValue("eval.code_timeout_s", f"must be a number > 0, got {e.code_timeout_s!r}")
    if ALIASES[d.task.lower()] == "code":
        _check_sandbox(e.code_allow_weak_sandbox)
    if d.source == "local":
        if not d.dir:
            raise BadValue("data.dir", "is empty; source 'local' reads the data folder "
                           "(shared/data: gsm8k/, mbpp/, humaneval/)")  # fmt: skip
        if not os.path.isdir(os.path.expanduser(d.dir)):
            layout = "gsm8k/train.jsonl, mbpp/mbpp.jsonl, humaneval/HumanEval.jsonl.gz"
            raise BadValue("data.dir", f"no such folder {d.dir!r} (shared/data layout: {layout})")
    if d.tokenizer == "model" and config.model.source != "pretrained":
        raise BadValue("data.tokenizer", "'model' needs model.source='pretrained' (a folder "
                       "with a tokenizer); use 'bytes' with the random model")  # fmt: skip


def _check_sandbox(allow_weak: bool) -> None:
    """Refuses to run generated code where the sandbox cannot hide the host, unless the
    config opts in (the sandbox's docstring says what is then left open)."""
    if not isinstance(allow_weak, bool):
        raise BadValue("eval.code_allow_weak_sandbox", f"must be True or False, got {allow_weak!r}")
    missing = sandbox.weak(sandbox.protections())
    if missing and not allow_weak:
        raise BadValue("eval.code_allow_weak_sandbox", f"the kernel refused the sandbox's "
                       f"{', '.join(missing)}, so generated programs could read this machine's "
                       "files (the data's reference solutions too); run where namespaces are "
                       "allowed (not under Docker's default seccomp profile) or set "
                       "--config.eval.code_allow_weak_sandbox=True")  # fmt: skip


# ----------------------------------------------------------------------------- loss


def loss_fn(model):
    """``loss(base, trainable, batch, dropout_key) -> (loss, tokens)``: summed NLL of the
    completion tokens of the real examples (``batch["mask"] [b]``) over their number of
    tokens, and that number."""

    def loss(base, trainable, batch, dropout_key):
        nll, tokens = model.apply(base, trainable, batch, deterministic=False,
                                  dropout_key=dropout_key)  # fmt: skip
        mask = batch["mask"].astype(jnp.float32)
        total = jnp.sum(tokens * mask)
        return jnp.sum(nll * mask) / jnp.maximum(total, 1.0), total

    return loss


# ----------------------------------------------------------------------------- evaluation


class Judged(NamedTuple):
    """The scores of completions, and per completion the answer the scorer extracted, the
    reference answer and whether the completion counts as right (GSM8K: the flexible exact
    match, the main metric; code: the extracted program passed its tests); ``counts``: per
    score, the completions it counts as right (each score is its count over the rows)."""

    metrics: dict[str, float]
    extracted: list
    gold: list
    correct: list[bool]
    counts: dict[str, int]


def judge(task: str, problems: list, completions: list[str], timeout_s: float) -> Judged:
    """The task's generation scores of ``completions`` (decoded text, one per problem)."""
    if task == "gsm8k":
        answers = [p.answer for p in problems]
        match = gsm8k.exact_match(completions, answers)
        return Judged(gsm8k.score(completions, answers),
                      [gsm8k.extract_flexible(c) for c in completions],
                      [gsm8k.reference(a) for a in answers],
                      [bool(r) for r in match["flexible"]],
                      {f"exact_match_{k}": int(v.sum()) for k, v in match.items()})  # fmt: skip
    programs = [code.extract_code(c, stops=code.PROGRAM_STOPS) for c in completions]
    result = code.evaluate(problems, [[p] for p in programs], ks=(1,), timeout_s=timeout_s)
    # One greedy sample a problem: pass@1 is the count of problems solved over the rows.
    return Judged(result.metrics, programs, [p.solution for p in problems],
                  [bool(r) for r in result.passed[:, 0]],
                  {"pass@1": int(result.passed[:, 0].sum())})  # fmt: skip


def bucket(n: int, batch_size: int) -> int:
    """Rows of the call that serves the last ``n`` rows of a set: the next power of two,
    at most ``batch_size``, so a short batch does little padding work and a run compiles
    at most ``log2(batch_size) + 1`` sizes."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def calls(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(first row, rows of the call)`` of each batched call over ``n`` rows."""
    return [(s, bucket(min(batch_size, n - s), batch_size)) for s in range(0, n, batch_size)]


def evaluator(task: str, model, corpus_: Corpus, holdout_index: list[np.ndarray],
              config) -> Evaluator:  # fmt: skip
    """Global evaluation on ``corpus_.tests`` and local on each client's held-out rows
    (``holdout_index[u]``, the first ``eval.max_local_examples``); see the module."""
    e, codec = config.eval, corpus_.codec
    batch_size, P, max_new = e.batch_size, corpus_.prompt_length, e.max_new_tokens
    positions = decoder.parse_config(model.config).max_positions
    if P + max_new > positions:
        raise ConfigError(
            f"config field eval.max_new_tokens: prompts of {P} tokens plus "
            f"{max_new} new ones exceed the model's {positions} positions"
        )
    forward = jax.jit(lambda base, trainable, batch: model.apply(base, trainable, batch))
    cap, stops = e.max_local_examples, tuple(e.stop)
    stop_ids = completion.stop_sequences(codec, stops)
    decode = functools.partial(decoder.generate, model, max_new_tokens=max_new,
                               eos_ids=(codec.eos_id,), stop_ids=stop_ids,
                               pad_id=codec.pad_id)  # fmt: skip
    holdout_index = [h[:cap] if cap else h for h in holdout_index]

    def generate(base, adapters, items: list[Item], tick) -> list[str]:
        """The completions of ``items``, each cut at its eos and its first stop string."""
        out = []
        for start, rows in calls(len(items), batch_size):
            chunk = items[start : start + rows]
            prompts = [i.prompt for i in chunk] + [[codec.pad_id]] * (rows - len(chunk))
            ids, mask = completion.left_pad(prompts, P, codec.pad_id)
            new = np.asarray(decode(base, adapters, ids, mask))
            texts_ = [codec.decode(completion.until_eos(r, codec.eos_id)) for r in new]
            out += [completion.cut_at(t, stops) for t in texts_[: len(chunk)]]
            tick()
        return out

    def answer_nll(base, trainable, items: list[Item]) -> tuple[float, float]:
        """The summed NLL of the reference answers' tokens, and their number."""
        arrays = item_arrays(items, corpus_.length, config.data.max_length)
        nll = tokens = 0.0
        for start, rows in calls(len(items), batch_size):
            take = np.arange(start, start + rows) % len(items)
            n, t = forward(base, trainable, {k: v[take] for k, v in arrays.items()})
            real = np.arange(start, start + rows) < len(items)
            nll += float(np.sum(np.asarray(n)[real]))
            tokens += float(np.sum(np.asarray(t)[real]))
        return nll, tokens

    def answer_loss(base, trainable, items: list[Item]) -> float:
        nll, tokens = answer_nll(base, trainable, items)
        return nll / max(tokens, 1.0)

    def evaluate(base, trainable, items: list[Item], prefix: str, tick, keep: int = 0):
        """(``{prefix + metric: value}``, the records of the first ``keep`` items)."""
        if not items:
            return {}, []
        completions = generate(base, trainable["lora"], items, tick)
        judged = judge(task, [i.problem for i in items], completions, e.code_timeout_s)
        out = judged.metrics | {"answer_loss": answer_loss(base, trainable, items)}
        records = [
            {"set": getattr(item.problem, "benchmark", task), "index": k,
             "prompt": codec.decode(item.prompt), "output": completions[k],
             "extracted": judged.extracted[k], "gold": judged.gold[k],
             "correct": judged.correct[k]}
            for k, item in enumerate(items[:keep])
        ]  # fmt: skip
        return {prefix + k: v for k, v in out.items()}, records

    def global_eval(base, trainable, record=None) -> dict[str, float]:
        """The scores on every test set; ``record(records)``, if given, receives each set's
        first ``eval.log_generations`` generations (dicts: set, index, prompt, output,
        extracted, gold, correct)."""
        out = {}
        total = sum(len(calls(len(items), batch_size)) for items in corpus_.tests.values())
        with progress.bar("eval global", total, "batch") as tick:
            for prefix, items in corpus_.tests.items():
                scores, records = evaluate(base, trainable, items, prefix, tick,
                                           e.log_generations)  # fmt: skip
                out |= scores
                if record is not None and records:
                    record(records)
        return out

    def client_stats(base, trainable, items: list[Item], tick) -> dict[str, np.ndarray]:
        """One client's sufficient statistics on its held-out ``items``: ``rows``, per score
        its count of right completions, and ``answer_nll`` over ``answer_tokens``."""
        if not items:
            return {"rows": np.asarray(0)}
        completions = generate(base, trainable["lora"], items, tick)
        judged = judge(task, [i.problem for i in items], completions, e.code_timeout_s)
        nll, tokens = answer_nll(base, trainable, items)
        counts = {"rows": len(items), **judged.counts, "answer_nll": nll, "answer_tokens": tokens}
        return {k: np.asarray(v) for k, v in counts.items()}

    def local_stats(base, trainable_U, client_ids) -> list[dict[str, np.ndarray]]:
        held_out = [[corpus_.train[j] for j in holdout_index[int(u)]] for u in client_ids]
        total = sum(len(calls(len(items), batch_size)) for items in held_out)
        with progress.bar("eval local", total, "batch") as tick:
            return [client_stats(base, jax.tree.map(lambda x, i=i: x[i], trainable_U), items, tick)
                    for i, items in enumerate(held_out)]  # fmt: skip

    def combine(stats: list[dict[str, np.ndarray]]) -> dict[str, float]:
        """The mean over clients with held-out rows of each one's scores from its counts
        (the same divisions as a score of its rows: ``judge``, ``answer_loss``)."""
        scores = []
        for s in stats:
            n = int(s["rows"])
            if n:
                rates = {k: int(v) / n for k, v in s.items() if k not in STAT_SUMS}
                loss = float(s["answer_nll"]) / max(float(s["answer_tokens"]), 1.0)
                scores.append(rates | {"answer_loss": loss})
        if not scores:
            return {}
        return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}

    def local_eval(base, trainable_U, client_ids) -> dict[str, float]:
        return combine(local_stats(base, trainable_U, client_ids))

    def programs(base, trainable_U) -> list[Program]:
        """Greedy decoding ``[batch_size, P]`` and the answer-loss forward ``[batch_size,
        L]``, each run once per batch of every test set and of the sampled clients'
        held-out rows (a set's last, bucketed batch counted at the full size)."""
        trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                 trainable_U)  # fmt: skip
        sizes = [len(items) for items in corpus_.tests.values()]
        if e.local:
            sizes += [len(h) for h in holdout_index[: config.train.clients_per_round]]
        runs = sum(len(calls(n, batch_size)) for n in sizes)
        prompt = jax.ShapeDtypeStruct((batch_size, P), jnp.int32)
        rows = item_arrays(corpus_.train[:1], corpus_.length, config.data.max_length)
        batch = {k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype)
                 for k, v in rows.items()}  # fmt: skip
        return [Program("generate", jax.jit(decode), (base, trainable["lora"], prompt, prompt),
                        runs, loop_trips=max_new - 1),
                Program("answer loss", forward, (base, trainable, batch), runs)]  # fmt: skip

    return Evaluator(global_eval, local_eval, local_stats, combine, programs)
