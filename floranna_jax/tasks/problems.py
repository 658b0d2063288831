"""The problems of the generation tasks (GSM8K, code), read and tokenized: what
:mod:`floranna_jax.tasks.generation` trains on and scores.

``read_corpus(task, config)`` reads ``data.source`` (``"local"``: ``data.dir`` in the layout
of shared/data; ``"hub"``; ``"synthetic"``: :mod:`floranna_jax.data.synthetic_text`),
tokenizes prompts and targets with ``data.tokenizer`` in the format ``data.prompt``, and
picks one row length for the run; :func:`corpus` reads it once per data fields;
:func:`item_arrays` turns items into the token rows a run trains on. The texts (questions,
references, tests) stay here, out of the arrays.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from absl import logging

from floranna_jax.data import code, completion, glue, gsm8k, synthetic_text
from floranna_jax.errors import ConfigError, first_line
from floranna_jax.tasks.task import Arrays


class Item(NamedTuple):
    """One example: prompt and target ids (target ends in eos), and what scores it (a
    ``gsm8k.Problem`` or a ``code.Problem``)."""

    prompt: list[int]
    target: list[int]
    problem: Any


class Corpus(NamedTuple):
    """train: the training items (rows of the train arrays). tests: ``prefix -> items`` of
    each global test set ("" first: the main one). length: ``L`` of every token row;
    prompt_length: the generation prompts' padded length. codec: the tokenizer."""

    train: list[Item]
    tests: dict[str, list[Item]]
    length: int
    prompt_length: int
    codec: completion.Codec


def _codec(config) -> completion.Codec:
    if config.data.tokenizer == "bytes":
        return completion.byte_codec()
    try:
        return completion.hf_codec(glue.load_tokenizer(os.path.expanduser(config.model.path)))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"config field model.path: cannot load a tokenizer from {config.model.path!r}: "
            f"{first_line(e) or type(e).__name__}; offline? convert or fetch a local folder "
            "and pass --config.model.path=<folder>"
        ) from e


def _problems(task: str, config) -> tuple[list, dict[str, list]]:
    """(training problems, ``prefix -> test problems``) of ``data.source``."""
    d, seed = config.data, config.train.seed
    if d.source == "synthetic":
        if task == "gsm8k":
            test = synthetic_text.arithmetic(d.num_eval_examples, seed=seed + 1)
            return synthetic_text.arithmetic(d.num_train_examples, seed=seed), {"": test}
        return (synthetic_text.functions(d.num_train_examples, seed=seed), {
            "": synthetic_text.functions(d.num_eval_examples, seed=seed + 1),
            "humaneval_": synthetic_text.functions(d.num_eval_examples, seed=seed + 2,
                                                   benchmark="humaneval")})  # fmt: skip
    data_dir = os.path.expanduser(d.dir) if d.source == "local" else None
    try:
        if task == "gsm8k":
            test = gsm8k.read("test", data_dir=data_dir)
            return gsm8k.read("train", data_dir=data_dir), {"": test}
        return code.read_mbpp("train", data_dir=data_dir), {
            "": code.read_mbpp("test", data_dir=data_dir),
            "humaneval_": code.read_humaneval(data_dir=data_dir)}  # fmt: skip
    except ValueError as e:  # a malformed file: the message names the file and the line
        raise ConfigError(first_line(e)) from e
    except (OSError, RuntimeError) as e:
        field = "data.dir" if data_dir else "data.source"
        raise ConfigError(f"config field {field}: {first_line(e)}") from e


def texts(problem) -> tuple[str, str]:
    """(user text, target text) of a GSM8K or code problem."""
    if isinstance(problem, gsm8k.Problem):
        return f"Question: {problem.question}\nAnswer:\n", gsm8k.target(problem.answer)
    if problem.benchmark == "humaneval":
        user = f"Complete this Python function:\n```python\n{problem.prompt}```\n"
        return user, f"```python\n{problem.prompt}{problem.solution.rstrip()}\n```"
    tests = "\n".join(problem.test_list)
    user = f"{problem.prompt}\nYour code should pass these tests:\n{tests}\n"
    return user, f"```python\n{problem.solution.strip()}\n```"


def _items(problems, codec, fmt: str) -> list[Item]:
    out = []
    for p in problems:
        user, target = texts(p)
        out.append(Item(completion.prompt_ids(codec, user, fmt),
                        completion.target_ids(codec, target), p))  # fmt: skip
    return out


def _check_sets(task: str, train: list[Item], tests: dict[str, list[Item]], max_length: int):
    """Raise ConfigError for an empty test set, or when ``max_length`` cuts every training
    row before its completion starts (no loss token anywhere: loss 0, nothing learned)."""
    for prefix, items in tests.items():
        if not items:
            name = prefix.rstrip("_") or task
            raise ConfigError(f"config field data.dir: the {name} test set has no problems; "
                              "give a data folder that holds them")  # fmt: skip
    if train and all(len(i.prompt) >= max_length for i in train):
        shortest = min(len(i.prompt) for i in train)
        whole = max(len(i.prompt) + len(i.target) for i in train)
        raise ConfigError(
            f"config field data.max_length: {max_length} tokens cut every training example "
            f"before its answer (prompts take {shortest}+ tokens), so nothing would be "
            f"learned; raise it above {shortest} ({whole} keeps every answer whole)"
        )


def read_corpus(task: str, config) -> Corpus:
    """The task's examples for ``config``, tokenized."""
    codec = _codec(config)
    try:
        fmt = completion.resolve_format(codec, config.data.prompt)
    except ValueError as e:
        raise ConfigError(f"config field data.prompt: {e}") from e
    train_problems, test_problems = _problems(task, config)
    d, cap = config.data, config.eval.max_examples
    if d.source != "synthetic" and d.max_train_examples:
        train_problems = train_problems[: d.max_train_examples]
    train = _items(train_problems, codec, fmt)
    tests = {k: _items(v[:cap] if cap else v, codec, fmt) for k, v in test_problems.items()}
    _check_sets(task, train, tests, d.max_length)
    every = [*train, *(i for items in tests.values() for i in items)]
    length = completion.row_length([len(i.prompt) + len(i.target) for i in every], d.max_length)
    prompt_length = completion.row_length([len(i.prompt) for i in every], d.max_length)
    cut = sum(len(i.prompt) + len(i.target) > length for i in every)
    if cut:
        logging.warning("%d of %d examples longer than data.max_length=%d are cut at the end",
                        cut, len(every), d.max_length)  # fmt: skip
    return Corpus(train, tests, length, prompt_length, codec)


def corpus(task: str, config, cache: dict) -> Corpus:
    """The task's examples for ``config``, read once per distinct data fields (``cache``:
    the task instance's own)."""
    key = (config.data.to_json(), config.model.path, config.model.source,
           config.eval.max_examples, config.train.seed)  # fmt: skip
    if key not in cache:
        cache.clear()  # one corpus at a time: a task instance serves one run
        cache[key] = read_corpus(task, config)
    return cache[key]


def item_arrays(items: list[Item], length: int, max_length: int) -> Arrays:
    return completion.arrays([i.prompt for i in items], [i.target for i in items],
                             max_length=max_length, length=length)  # fmt: skip
