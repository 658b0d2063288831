"""MBPP and HumanEval: real splits, the program run for a completion, code extraction from
a model's answer, and the pass@k estimator against exact binomials."""

import fractions
import json
import math

import numpy as np
import pytest

from floranna_jax.data import code

MBPP_COUNTS = {  # the standard splits (as on the hub, google-research-datasets/mbpp)
    "full": {"prompt": 10, "test": 500, "validation": 90, "train": 374},
    "sanitized": {"prompt": 7, "test": 257, "validation": 43, "train": 120},
}


@pytest.mark.parametrize("variant", sorted(MBPP_COUNTS))
def test_mbpp_splits_by_task_id(mbpp_dir, variant):
    ids = {}
    for split, (low, high) in code.MBPP_SPLITS.items():
        problems = code.read_mbpp(split, data_dir=mbpp_dir, variant=variant)
        assert len(problems) == MBPP_COUNTS[variant][split]
        ids[split] = [int(p.task_id.split("/")[1]) for p in problems]
        assert ids[split] == sorted(ids[split]) and low <= ids[split][0] <= ids[split][-1] <= high
        assert all(p.benchmark == "mbpp" and p.test_list and p.solution for p in problems)
        assert all(p.test == "\n".join(p.test_list) for p in problems)
    assert sum(map(len, ids.values())) == len(set().union(*map(set, ids.values())))


def test_mbpp_first_test_problem(mbpp_dir):
    first = code.read_mbpp("test", data_dir=mbpp_dir.parent)[0]  # also under data_dir/mbpp
    assert first.task_id == "MBPP/11" and first.prompt.startswith("Write a python function to")
    assert first.test_list[0] == 'assert remove_Occ("hello","l") == "heo"'
    tree = next(p for p in code.read_mbpp("test", data_dir=mbpp_dir) if p.task_id == "MBPP/367")
    assert tree.setup.startswith("root = Node(1)")  # builds trees with the solution's Node
    program = code.program(tree, tree.solution)
    assert program.index("class Node") < program.index("root = Node(1)") < program.index("assert")
    sanitized = code.read_mbpp("test", data_dir=mbpp_dir, variant="sanitized")
    assert any(p.setup == "import math" for p in sanitized)  # from test_imports


def test_humaneval_problems_and_programs(humaneval_dir):
    problems = code.read_humaneval(data_dir=humaneval_dir)
    assert len(problems) == 164 and len({p.task_id for p in problems}) == 164
    first = problems[0]
    assert (first.task_id, first.entry_point) == ("HumanEval/0", "has_close_elements")
    program = code.program(first, first.solution)
    assert program.startswith(first.prompt + first.solution)
    assert program.rstrip().endswith("check(has_close_elements)")


def test_whole_function_answers_replace_the_prompts_stub(humaneval_dir):
    """A chat model writes the whole function in a fenced block; it still passes."""
    problems = code.read_humaneval(data_dir=humaneval_dir)[:3]
    answers = [
        f"Sure! Here it is:\n```python\n{p.prompt}{p.solution}```\nIt sorts first."
        for p in problems
    ]
    completions = [[code.extract_code(a, stops=code.PROGRAM_STOPS)] for a in answers]
    assert all(c[0].lstrip().startswith(("from", "import", "def")) for c in completions)
    assert code.evaluate(problems, completions, timeout_s=20).metrics == {"pass@1": 1.0}


def test_evaluate_pass_at_k(humaneval_dir, mbpp_dir):
    problems = code.read_humaneval(data_dir=humaneval_dir)[:2]
    problems += code.read_mbpp("test", data_dir=mbpp_dir)[:1]
    wrong = ["    return None\n", "    return None\n", "def remove_Occ(s, ch):\n    return s\n"]
    completions = [[w, p.solution] for p, w in zip(problems, wrong, strict=True)]
    completions[2] = [wrong[2], wrong[2]]  # MBPP: two wrong samples
    out = code.evaluate(problems, completions, ks=(1, 2), timeout_s=20)
    np.testing.assert_array_equal(out.passed, [[False, True], [False, True], [False, False]])
    assert out.metrics == pytest.approx({"pass@1": (0.5 + 0.5 + 0) / 3, "pass@2": 2 / 3})
    assert out.results[0][0].reason == "exit 1: AssertionError"
    with pytest.raises(ValueError, match=r"same n >= 1 samples, got \[1, 2\]"):
        code.evaluate(problems, [["a"], ["b", "c"], ["d"]])
    with pytest.raises(ValueError, match=r"same n >= 1 samples, got \[0\]"):
        code.evaluate(problems, [[], [], []])


@pytest.mark.parametrize(
    ("text", "stops", "want"),
    [
        ("```python\ndef f():\n    return 1\n```\nsome prose", (), "def f():\n    return 1\n"),
        ("```\nx = 1\n```", (), "x = 1\n"),
        ("```bash\npip install x\n```\n```py\nx = 2\n```", (), "x = 2\n"),
        ("text\n```python\ndef f():\n    return 1", (), "def f():\n    return 1"),  # unclosed
        ("    return a + b\n\ndef g():\n    pass", code.COMPLETION_STOPS, "    return a + b\n"),
        ("    return 1\n# test\nprint(f())", code.COMPLETION_STOPS, "    return 1"),
        (
            "```python\ndef f():\n    return 1\n\nif __name__ == '__main__':\n    f()\n```",
            code.PROGRAM_STOPS,
            "def f():\n    return 1\n",
        ),
        ("def f():\n    return 1\nassert f() == 1\n", code.PROGRAM_STOPS, "def f():\n    return 1"),
        ("    if x:\n        return 1", code.COMPLETION_STOPS, "    if x:\n        return 1"),
    ],
)
def test_extract_code(text, stops, want):
    assert code.extract_code(text, stops=stops) == want


def _exact_pass_at_k(n: int, c: int, k: int) -> fractions.Fraction:
    return 1 - fractions.Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_equals_exact_binomials():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                got = float(code.pass_at_k(n, c, k))
                assert got == pytest.approx(float(_exact_pass_at_k(n, c, k)), abs=1e-12)
    # large n: C(200, 100) ~ 9e58 never formed; still exact to float precision
    assert float(code.pass_at_k(200, 13, 100)) == pytest.approx(
        float(_exact_pass_at_k(200, 13, 100)), rel=1e-12
    )
    assert code.pass_at_k(np.array([1, 1, 5]), np.array([0, 1, 5]), 1).tolist() == [0, 1, 1]
    assert float(code.pass_at_k(10, 3, 1)) == pytest.approx(0.3)  # pass@1 = c / n
    with pytest.raises(ValueError, match="0 <= c <= n"):
        code.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k=5 needs 1 <= k <= n"):
        code.pass_at_k(3, 1, 5)


def test_score_greedy_pass_at_1():
    passed = np.array([[True], [False], [True], [True]])
    assert code.score(passed) == {"pass@1": 0.75}
    assert code.score(np.zeros((0, 1), bool)) == {"pass@1": 0.0}
    with pytest.raises(ValueError, match=r"\[problems, samples\]"):
        code.score(np.array([True, False]))


def test_bad_files_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        code.read_humaneval(data_dir=tmp_path)
    assert str(tmp_path / "HumanEval.jsonl.gz") in str(err.value)
    assert str(tmp_path / "humaneval" / "HumanEval.jsonl") in str(err.value)
    row = {"text": "t", "code": "c", "task_id": 11, "test_setup_code": "", "test_list": ["a"]}
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(row)[:-5] + "\n")
    with pytest.raises(ValueError, match=f"^{path}:2: malformed JSON line"):
        code.read_mbpp("test", data_dir=tmp_path)
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "task_id": "12"}) + "\n")
    with pytest.raises(ValueError, match=f"^{path}:2: field 'task_id' should be int, got str"):
        code.read_mbpp("test", data_dir=tmp_path)
    path.write_text(json.dumps(row) + "\n")
    assert [p.task_id for p in code.read_mbpp("test", data_dir=tmp_path)] == ["MBPP/11"]
    assert code.read_mbpp("train", data_dir=tmp_path) == []
    with pytest.raises(ValueError, match="unknown MBPP split 'dev'; valid splits: prompt, test"):
        code.read_mbpp("dev", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown MBPP variant 'plus'"):
        code.read_mbpp("test", data_dir=tmp_path, variant="plus")
    with pytest.raises(ValueError, match="unknown benchmark 'apps'"):
        code.program(code.Problem("apps", "x", "", "", "", (), "", ""), "")


def test_hub_paths(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    he = {"task_id": ["HumanEval/0"], "prompt": ["def f():\n"], "canonical_solution": ["  1"],
          "test": ["def check(c): pass"], "entry_point": ["f"]}  # fmt: skip
    mbpp = {"task_id": [601], "text": ["t"], "code": ["c"], "test_list": [["assert 1"]],
            "test_setup_code": [""], "challenge_test_list": [[]]}  # fmt: skip

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(he if "humaneval" in path else mbpp)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert code.read_humaneval()[0].entry_point == "f"
    assert code.read_mbpp("train")[0].task_id == "MBPP/601"
    assert calls == [
        ("openai/openai_humaneval", None, "test"),
        ("google-research-datasets/mbpp", "full", "train"),
    ]

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"google-research-datasets/mbpp.*Pass data_dir="):
        code.read_mbpp("test", variant="sanitized")
