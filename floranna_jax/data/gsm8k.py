"""GSM8K (grade-school math): read the problems, make training targets, score answers.

    rows = gsm8k.read("test", data_dir="/data/gsm8k")  # list[Problem]; None: the hub
    gsm8k.target(rows[0].answer)    # "Janet sells 16 - 3 - 4 = 9 duck eggs ...\\n#### 18"
    gsm8k.score(completions, [r.answer for r in rows])
    # {"exact_match_strict": 0.41, "exact_match_flexible": 0.45}

Sources: data_dir=None reads the hub ("openai/gsm8k", config "main"); a path reads
PATH/{train,test}.jsonl (or PATH/gsm8k/...), the layout of OpenAI's release, one
{"question", "answer"} object a line. An answer is a worked solution with calculator
annotations "<<48/2=24>>" and a last line "#### 72".

Scoring is exact match of the final number, in two forms:
  strict    the number after the first "#### " (the form the model was trained to write)
  flexible  the last number anywhere in the text
Both sides are normalized as common harnesses do (lm-evaluation-harness's GSM8K task):
commas and "$" removed, one trailing period removed, then compared as strings, so
"$1,000." == "1000" but "18.00" != "18". Our number pattern needs a digit, where the
harness would also take a lone "$" or "..." for a number.
"""

import os
import pathlib
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from floranna_jax.data import jsonl, sources

SPLITS = ("train", "test")
HUB_PATH, HUB_CONFIG = "openai/gsm8k", "main"

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_STRICT = re.compile(r"#### *(-?[$0-9.,]*[0-9][$0-9.,]*)")
_NUMBER = re.compile(r"-?\$?[0-9][0-9,]*(?:\.[0-9]+)?")


class Problem(NamedTuple):
    """One GSM8K row: the question and its reference answer (worked solution, "#### N")."""

    question: str
    answer: str


def _split_name(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown GSM8K split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def split_path(split: str, data_dir: str | os.PathLike) -> pathlib.Path:
    """The file of `split` under `data_dir` (also under data_dir/gsm8k); raises
    FileNotFoundError naming every path tried."""
    name = f"{_split_name(split)}.jsonl"
    return sources.find_file(data_dir, "gsm8k", [name], f"GSM8K split {split!r}")


def read(split: str, *, data_dir: str | os.PathLike | None = None) -> list[Problem]:
    """The problems of `split` ("train": 7,473, "test": 1,319), in file order.

    Raises ValueError naming the file and line of a malformed row or of an answer
    without its "#### N" line.
    """
    if data_dir is None:
        hint = "<folder holding train.jsonl and test.jsonl>"
        ds = sources.load_hub(HUB_PATH, HUB_CONFIG, _split_name(split), "GSM8K", hint=hint)
        return [Problem(q, a) for q, a in zip(ds["question"], ds["answer"], strict=True)]
    rows = jsonl.read(
        split_path(split, data_dir), required={"question": str, "answer": str}, check=_check_row
    )
    return [Problem(r["question"], r["answer"]) for r in rows]


def _check_row(row: dict) -> None:
    if reference(row["answer"]) is None:
        raise ValueError(f"answer has no '#### <number>' line: {row['answer'][-80:]!r}")


def strip_calculator(text: str) -> str:
    """Removes the calculator annotations: "48/2 = <<48/2=24>>24" -> "48/2 = 24"."""
    return _CALCULATOR.sub("", text)


def target(answer: str) -> str:
    """The training target of a reference answer: without calculator annotations, ending
    in its "#### N" line (and nothing after it)."""
    text = strip_calculator(answer).rstrip()
    match = _STRICT.search(text)
    if match is None:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer[-80:]!r}")
    return text[: match.end()]


def normalize(number: str) -> str:
    """A number as harnesses compare it: no commas or "$", no trailing period."""
    text = number.strip().replace(",", "").replace("$", "")
    return text[:-1] if text.endswith(".") else text


def extract_strict(text: str) -> str | None:
    """The normalized number after the first "#### ", or None."""
    match = _STRICT.search(text)
    return normalize(match.group(1)) if match else None


def extract_flexible(text: str) -> str | None:
    """The normalized last number of the text, or None."""
    numbers = _NUMBER.findall(text)
    return normalize(numbers[-1]) if numbers else None


def reference(answer: str) -> str | None:
    """The normalized final number of a reference answer (after its "####")."""
    return extract_strict(answer)


def exact_match(completions: Sequence[str], answers: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-example correctness, bool [N] each for "strict" and "flexible"; `answers` are
    the reference answers (worked solutions) or their bare final numbers. Concatenate
    these arrays to merge clients or batches."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions for {len(answers)} answers")
    gold = [extract_strict(a) or extract_flexible(a) for a in answers]
    out = {}
    for name, extract in (("strict", extract_strict), ("flexible", extract_flexible)):
        same = [g is not None and extract(c) == g for c, g in zip(completions, gold, strict=True)]
        out[name] = np.array(same, bool)
    return out


def score(completions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """{"exact_match_strict", "exact_match_flexible"}: fractions of `completions` whose
    number equals the reference's (see `exact_match`)."""
    match = exact_match(completions, answers)
    n = max(len(completions), 1)
    return {f"exact_match_{k}": float(v.sum() / n) for k, v in match.items()}
