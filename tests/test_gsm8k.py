"""GSM8K: the real files, training targets, and exact-match scoring with its edge cases."""

import numpy as np
import pytest

from floranna_jax.data import gsm8k


def test_real_splits_targets_and_references(gsm8k_dir):
    train = gsm8k.read("train", data_dir=gsm8k_dir)
    test = gsm8k.read("test", data_dir=gsm8k_dir.parent)  # also found under data_dir/gsm8k
    assert (len(train), len(test)) == (7473, 1319)
    assert test[0].question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert gsm8k.target(test[0].answer) == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer\u2019s market.\n#### 18"
    )
    assert gsm8k.reference(train[345].answer) == "1080"  # written "#### 1,080"
    for rows in (train, test):
        targets = [gsm8k.target(r.answer) for r in rows]
        assert not any("<<" in t or ">>" in t for t in targets)
        assert all(t.rsplit("\n", 1)[-1].startswith("#### ") for t in targets)
        # a model that writes the target scores 100% under both forms
        scores = gsm8k.score(targets, [r.answer for r in rows])
        assert scores == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}


def test_strip_calculator_and_target():
    answer = "She sold 48/2 = <<48/2=24>>24 clips.\nIn all <<48+24=72>>72 clips.\n#### 72\n"
    assert gsm8k.strip_calculator(answer).startswith("She sold 48/2 = 24 clips.\nIn all 72")
    assert gsm8k.target(answer) == "She sold 48/2 = 24 clips.\nIn all 72 clips.\n#### 72"
    with pytest.raises(ValueError, match="no '#### <number>' line"):
        gsm8k.target("no final line 5")


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("so the total is 1,000.\n#### 1,000.", "1000", "1000"),
        ("It costs $1,000.", None, "1000"),
        ("#### $18", "18", "18"),
        ("####-3", "-3", "-3"),
        ("The change is -3 degrees.\n#### -3", "-3", "-3"),
        ("It is 18.00 dollars", None, "18.00"),
        ("#### 5\nQuestion: next one ... #### 7", "5", "7"),  # strict: the first; flexible: last
        ("3 apples, 4 pears, 7 fruits, ", None, "7"),
        ("Rates: 2.5%. Done...", None, "2.5"),
        ("no number here...", None, None),
        ("#### five", None, None),
    ],
)
def test_extraction_and_normalization(text, strict, flexible):
    assert gsm8k.extract_strict(text) == strict
    assert gsm8k.extract_flexible(text) == flexible


def test_normalize_like_the_harness():
    assert gsm8k.normalize(" 1,000. ") == gsm8k.normalize("$1000") == "1000"
    assert gsm8k.normalize("18.00") != gsm8k.normalize("18")  # strings, as harnesses compare


def test_exact_match_and_score():
    answers = ["... #### 1,080", "#### 18", "#### -3", "#### 7"]
    completions = [
        "It comes to $1,080.\n#### 1080",  # both
        "She makes 18 dollars.",  # flexible only
        "#### -3 and then 5 more",  # strict only
        "I am not sure.",  # neither
    ]
    match = gsm8k.exact_match(completions, answers)
    np.testing.assert_array_equal(match["strict"], [True, False, True, False])
    np.testing.assert_array_equal(match["flexible"], [True, True, False, False])
    assert gsm8k.score(completions, answers) == {
        "exact_match_strict": 0.5,
        "exact_match_flexible": 0.5,
    }
    assert gsm8k.exact_match(["#### 42"], ["42"])["strict"].tolist() == [True]  # bare number
    assert gsm8k.score([], []) == {"exact_match_strict": 0.0, "exact_match_flexible": 0.0}
    with pytest.raises(ValueError, match="2 completions for 1 answers"):
        gsm8k.score(["1", "2"], ["#### 1"])


def test_bad_files_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        gsm8k.read("test", data_dir=tmp_path)
    assert str(tmp_path / "test.jsonl") in str(err.value)
    assert str(tmp_path / "gsm8k" / "test.jsonl") in str(err.value)
    path = tmp_path / "train.jsonl"
    good = '{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\\n#### 2"}\n'
    path.write_text(good + '{"question": "2+2?", "answer": "4\\n#### 4"\n')
    with pytest.raises(ValueError, match=f"^{path}:2: malformed JSON line"):
        gsm8k.read("train", data_dir=tmp_path)
    path.write_text(good + '{"question": "2+2?"}\n')
    with pytest.raises(ValueError, match=f"^{path}:2: missing field\\(s\\) \\['answer'\\]"):
        gsm8k.read("train", data_dir=tmp_path)
    path.write_text(good + good + '{"question": "2+2?", "answer": "four"}\n')
    with pytest.raises(ValueError, match=f"^{path}:3: answer has no '#### <number>' line"):
        gsm8k.read("train", data_dir=tmp_path)
    path.write_text(good)
    assert gsm8k.read("train", data_dir=tmp_path) == [
        gsm8k.Problem("1+1?", "1+1=<<1+1=2>>2\n#### 2")
    ]
    with pytest.raises(
        ValueError, match="unknown GSM8K split 'validation'; valid splits: train, test"
    ):
        gsm8k.read("validation", data_dir=tmp_path)


def test_hub_path(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"question": ["q"], "answer": ["a\n#### 3"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert gsm8k.read("test") == [gsm8k.Problem("q", "a\n#### 3")]
    assert calls == [("openai/gsm8k", "main", "test")]

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"openai/gsm8k.*Pass data_dir=<folder holding train"):
        gsm8k.read("train")
