"""Code generation tasks: MBPP and HumanEval problems, the program that tests a completion,
code extraction from a model's answer, and pass@k.

    problems = code.read_mbpp("test", data_dir="/data/mbpp")      # task ids 11-510
    problems = code.read_humaneval(data_dir="/data/humaneval")     # 164 problems
    answer = code.extract_code(model_text, stops=code.COMPLETION_STOPS)
    out = code.evaluate(problems, [[answer_0], [answer_1], ...], ks=(1,))
    out.metrics     # {"pass@1": 0.31}; n samples a problem and ks=(1, 10) for pass@10

Sources: data_dir=None reads the hub (MBPP: "google-research-datasets/mbpp", configs
"full" and "sanitized"; HumanEval: "openai/openai_humaneval"); a path reads the files of
the original releases: mbpp.jsonl or sanitized-mbpp.json (under PATH or PATH/mbpp), and
HumanEval.jsonl.gz (or .jsonl, under PATH or PATH/humaneval).

MBPP splits are the standard ranges of task ids (MBPP_SPLITS): 1-10 few-shot prompt
examples, 11-510 test, 511-600 validation, 601-974 train. HumanEval is evaluation only.

The program run for a completion (`program`): HumanEval: prompt + completion + test +
"check(entry_point)"; a completion that writes out the whole function is placed after the
prompt, whose docstring-only function it replaces. MBPP: completion + test_setup_code (or
the sanitized set's test_imports) + the asserts of test_list. Programs run in
floranna_jax.sandbox, never in this process.
"""

import os
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from floranna_jax import sandbox
from floranna_jax.data import completion, jsonl, sources

MBPP_SPLITS = {
    "prompt": (1, 10),
    "test": (11, 510),
    "validation": (511, 600),
    "train": (601, 974),
}
MBPP_VARIANTS = {"full": "mbpp.jsonl", "sanitized": "sanitized-mbpp.json"}
MBPP_HUB, HUMANEVAL_HUB = "google-research-datasets/mbpp", "openai/openai_humaneval"
HUMANEVAL_FILES = ("HumanEval.jsonl.gz", "HumanEval.jsonl")

# Where to cut a model's answer. COMPLETION_STOPS: a continuation of a function body (the
# HumanEval prompt style of Chen et al. 2021): anything at column 0 ends it. PROGRAM_STOPS:
# an answer that writes whole functions: what follows them is a demo, not the solution.
COMPLETION_STOPS = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\nassert ")
PROGRAM_STOPS = ("\nif __name__", "\nprint(", "\nassert ")

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PYTHON_TAGS = ("python", "python3", "py", "")


class Problem(NamedTuple):
    """One problem. benchmark: "mbpp" or "humaneval". task_id: "MBPP/11", "HumanEval/0".
    prompt: MBPP's description, or HumanEval's signature and docstring (what the model
    continues). solution: the reference code. test: the test code (MBPP: the asserts of
    test_list, one a line; HumanEval: the code defining check). test_list: MBPP's asserts
    (for prompts that show them). setup: code run before the tests (MBPP).
    entry_point: HumanEval's function name ("" for MBPP)."""

    benchmark: str
    task_id: str
    prompt: str
    solution: str
    test: str
    test_list: tuple[str, ...]
    setup: str
    entry_point: str


class CodeScore(NamedTuple):
    """metrics: {"pass@k": mean over problems}. passed: bool [N, n] (n samples a problem).
    results: the sandbox Result of each sample, [N][n]."""

    metrics: dict[str, float]
    passed: np.ndarray
    results: list[list[sandbox.Result]]


def _mbpp_problem(row: dict, variant: str) -> Problem:
    tests = tuple(row["test_list"])
    if variant == "sanitized":
        prompt, setup = row["prompt"], "\n".join(row["test_imports"])
    else:
        prompt, setup = row["text"], row["test_setup_code"]
    task = int(row["task_id"])
    return Problem("mbpp", f"MBPP/{task}", prompt, row["code"], "\n".join(tests), tests, setup, "")


def read_mbpp(
    split: str, *, data_dir: str | os.PathLike | None = None, variant: str = "full"
) -> list[Problem]:
    """MBPP problems of `split` (a key of MBPP_SPLITS) in task-id order. variant: "full"
    (974 tasks) or "sanitized" (427 hand-checked tasks, same id ranges)."""
    if split not in MBPP_SPLITS:
        raise ValueError(f"unknown MBPP split {split!r}; valid splits: {', '.join(MBPP_SPLITS)}")
    if variant not in MBPP_VARIANTS:
        raise ValueError(f"unknown MBPP variant {variant!r}; valid: {', '.join(MBPP_VARIANTS)}")
    fields = {"task_id": int, "code": str, "test_list": list}
    if variant == "sanitized":
        fields |= {"prompt": str, "test_imports": list}
    else:
        fields |= {"text": str, "test_setup_code": str}
    if data_dir is None:
        hint = "<folder holding mbpp.jsonl>"
        rows = list(sources.load_hub(MBPP_HUB, variant, split, "MBPP", hint=hint))
    else:
        path = sources.find_file(data_dir, "mbpp", [MBPP_VARIANTS[variant]], f"MBPP {variant}")
        reader = jsonl.read_list if path.suffix == ".json" else jsonl.read
        rows = reader(path, required=fields)
        low, high = MBPP_SPLITS[split]
        rows = sorted((r for r in rows if low <= r["task_id"] <= high), key=lambda r: r["task_id"])
    return [_mbpp_problem(r, variant) for r in rows]


def read_humaneval(*, data_dir: str | os.PathLike | None = None) -> list[Problem]:
    """The 164 HumanEval problems, in file order (evaluation only: no other split)."""
    fields = dict.fromkeys(("task_id", "prompt", "canonical_solution", "test", "entry_point"), str)
    if data_dir is None:
        hint = "<folder holding HumanEval.jsonl.gz>"
        rows = list(sources.load_hub(HUMANEVAL_HUB, None, "test", "HumanEval", hint=hint))
    else:
        rows = jsonl.read(sources.find_file(data_dir, "humaneval", HUMANEVAL_FILES, "HumanEval"),
                          required=fields)  # fmt: skip
    return [
        Problem(
            "humaneval",
            r["task_id"],
            r["prompt"],
            r["canonical_solution"],
            r["test"],
            (),
            "",
            r["entry_point"],
        )  # fmt: skip
        for r in rows
    ]


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def program(problem: Problem, completion: str) -> str:
    """The Python program that passes (exits 0) iff `completion` solves `problem`."""
    if problem.benchmark == "humaneval":
        glue = "\n" if _defines(completion, problem.entry_point) else ""
        body = problem.prompt + glue + completion
        return f"{body}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"
    if problem.benchmark == "mbpp":
        return f"{completion}\n\n{problem.setup}\n\n{problem.test}\n"
    raise ValueError(f"unknown benchmark {problem.benchmark!r}; valid: humaneval, mbpp")


def extract_code(text: str, *, stops: Sequence[str] = ()) -> str:
    """The code of a model's answer: the first ```python (or untagged) fenced block if the
    answer has one (an unclosed block runs to the end), else the answer itself; then cut
    at the earliest of `stops` (COMPLETION_STOPS or PROGRAM_STOPS)."""
    blocks = [code for tag, code in _FENCE.findall(text) if tag.lower() in _PYTHON_TAGS]
    return completion.cut_at(blocks[0] if blocks else text, stops)


def pass_at_k(n: np.ndarray | int, c: np.ndarray | int, k: int) -> np.ndarray:
    """Unbiased pass@k of each problem (Chen et al. 2021, eq. 1): 1 - C(n-c, k) / C(n, k),
    with n samples of which c passed. float64 of the shape of n and c (broadcast).

    Written as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials;
    it is exactly 1 when fewer than k samples failed.
    """
    n, c = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(c, np.int64))
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("pass_at_k: need 0 <= c <= n for every problem")
    if k < 1 or np.any(n < k):
        raise ValueError(f"pass_at_k: k={k} needs 1 <= k <= n samples for every problem")
    out = np.ones(n.shape, np.float64)
    for idx in np.ndindex(n.shape):
        if n[idx] - c[idx] >= k:
            out[idx] = 1.0 - np.prod(1.0 - k / np.arange(n[idx] - c[idx] + 1, n[idx] + 1))
    return out


def score(passed: np.ndarray, ks: Sequence[int] = (1,)) -> dict[str, float]:
    """{"pass@k": mean over problems} from bool [N, n] (n samples a problem). With one
    greedy sample a problem, pass@1 is the fraction of problems solved."""
    passed = np.asarray(passed, bool)
    if passed.ndim != 2:
        raise ValueError(f"passed must be [problems, samples], got shape {passed.shape}")
    n, c = np.full(len(passed), passed.shape[1]), passed.sum(1)
    return {f"pass@{k}": float(pass_at_k(n, c, k).mean()) if len(passed) else 0.0 for k in ks}


def evaluate(
    problems: Sequence[Problem],
    completions: Sequence[Sequence[str]],
    *,
    ks: Sequence[int] = (1,),
    timeout_s: float = 10.0,
    workers: int | None = None,
) -> CodeScore:
    """Runs every completion's program in the sandbox and scores pass@k.

    completions[i]: the n code completions of problems[i] (already through extract_code),
    the same n for every problem. All N * n programs run in parallel, `workers` at a time.
    """
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completion lists for {len(problems)} problems")
    counts = {len(c) for c in completions}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every problem needs the same n >= 1 samples, got {sorted(counts)}")
    n = counts.pop()
    programs = [program(p, c) for p, cs in zip(problems, completions, strict=True) for c in cs]
    flat = sandbox.run(programs, timeout_s=timeout_s, workers=workers)
    results = [flat[i * n : (i + 1) * n] for i in range(len(problems))]
    passed = np.array([[r.passed for r in rs] for rs in results], bool).reshape(-1, n)
    return CodeScore(score(passed, ks), passed, results)
