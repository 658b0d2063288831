"""GLUE reading and tokenization: exact row counts of the real files, error messages, hub path."""

import numpy as np
import pytest

from floranna_jax.data import glue

# Rows (header excluded) of the files in shared/data/glue, counted with csv.QUOTE_NONE;
# they match the official GLUE sizes (CoLA train = the official 8,551).
COUNTS = {
    ("sst2", "train"): 67349,
    ("sst2", "validation"): 872,
    ("sst2", "test"): 1821,
    ("mrpc", "train"): 3668,
    ("mrpc", "validation"): 408,
    ("mrpc", "test"): 1725,
    ("rte", "train"): 2490,
    ("rte", "validation"): 277,
    ("rte", "test"): 3000,
    ("cola", "train"): 8551,
    ("cola", "validation"): 1043,
    ("cola", "test"): 1063,
    ("stsb", "train"): 5749,
    ("stsb", "validation"): 1500,
    ("stsb", "test"): 1379,
    ("qnli", "validation"): 5463,
    ("qnli", "test"): 5463,
}


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return glue.load_tokenizer(minilm_dir)


@pytest.mark.parametrize(("task", "split"), sorted(COUNTS))
def test_local_row_counts_and_labels(glue_dir, task, split):
    ex = glue.read_examples(task, split, data_dir=glue_dir)
    info = glue.TASKS[task]
    n = COUNTS[task, split]
    assert len(ex.labels) == n
    assert [len(t) for t in ex.texts] == [n] * len(info.text_keys)
    assert all(ex.texts[0]), "every example has a first text"
    if split == "test":
        assert np.all(ex.labels == -1)
    elif info.is_regression:
        assert ex.labels.dtype == np.float32 and 0 <= ex.labels.min() and ex.labels.max() <= 5
    else:
        assert ex.labels.dtype == np.int32
        assert set(np.unique(ex.labels)) == set(range(info.num_labels))


def test_first_rows_parsed_by_column_name(glue_dir):
    mrpc = glue.read_examples("mrpc", "train", data_dir=glue_dir)  # BOM before "Quality"
    assert mrpc.labels[0] == 1 and mrpc.texts[0][0].startswith("Amrozi accused his brother")
    assert mrpc.texts[1][0].startswith("Referring to him as only")
    cola = glue.read_examples("CoLA", "train", data_dir=glue_dir)  # headerless
    assert cola.texts[0][0].startswith("Our friends won't buy this analysis")
    rte = glue.read_examples("rte", "dev", data_dir=glue_dir)
    assert rte.labels[0] == 1  # "not_entailment", the hub's id 1
    stsb = glue.read_examples("sts-b", "validation", data_dir=glue_dir)
    assert stsb.labels[:2].tolist() == [5.0, 4.75]
    assert stsb.texts[1][0] == "A man wearing a hard hat is dancing."


def test_task_names_and_aliases():
    assert set(glue.TASKS) == {
        "cola", "sst2", "mrpc", "stsb", "qqp", "mnli_matched", "mnli_mismatched", "qnli", "rte",
    }  # fmt: skip
    assert glue.get_task("SST-2").name == "sst2"
    assert glue.get_task("STS-B").name == "stsb"
    assert glue.get_task("MNLI").name == "mnli_matched"
    assert glue.get_task("mnli-mismatched").name == "mnli_mismatched"
    assert glue.TASKS["stsb"].num_labels == 1 and glue.TASKS["stsb"].is_regression
    assert glue.TASKS["mnli_mismatched"].hub_splits[1] == "validation_mismatched"


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'.*cola.*mnli_mismatched.*sst2"):
        glue.get_task("wnli")
    with pytest.raises(ValueError, match="valid splits: train, validation, test"):
        glue.read_examples("rte", "dev_matched", data_dir=".")


def test_missing_task_folder_names_the_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        glue.read_examples("qqp", "train", data_dir=tmp_path)
    assert str(tmp_path / "QQP") in str(err.value)
    assert str(tmp_path / "glue" / "QQP") in str(err.value)


def test_missing_split_file_names_the_path(glue_dir):
    with pytest.raises(FileNotFoundError, match=str(glue_dir / "QNLI" / "train.tsv")):
        glue.read_examples("qnli", "train", data_dir=glue_dir)


def test_malformed_row_names_file_and_line(tmp_path):
    (tmp_path / "RTE").mkdir()
    path = tmp_path / "RTE" / "train.tsv"
    path.write_text(
        "index\tsentence1\tsentence2\tlabel\n"
        '0\tA "quoted" premise.\tA hypothesis.\tentailment\n'
        "1\ta row missing its label\tnot_entailment\n"
    )
    with pytest.raises(ValueError, match=f"{path}:3: malformed row, 3 tab-separated fields"):
        glue.read_examples("rte", "train", data_dir=tmp_path)
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=f"{path}:3: bad label in column 'label'.*'maybe'"):
        glue.read_examples("rte", "train", data_dir=tmp_path)
    path.write_text('index\tsentence1\tsentence2\tlabel\n0\t"a\tb\t1\n')  # lone quote is text
    ex = glue.read_examples("rte", "train", data_dir=tmp_path)
    assert ex.texts[0] == ['"a'] and ex.labels.tolist() == [1]


def test_bucket_length():
    assert glue.bucket_length(np.array([5, 9, 17]), 128) == 32
    assert glue.bucket_length(np.array([3, 5]), 128) == 8
    assert glue.bucket_length(np.array([40, 300]), 128) == 128
    assert glue.bucket_length(np.arange(1, 101), 512, quantile=0.5) == 64


def test_tokenize_slice_of_sst2(glue_dir, tokenizer):
    ex = glue.read_examples("sst2", "train", data_dir=glue_dir)
    part = glue.Examples(tuple(t[:500] for t in ex.texts), ex.labels[:500])
    out = glue.tokenize({"train": part}, tokenizer, max_length=128)["train"]
    n, length = out["input_ids"].shape
    true_lengths = out["attention_mask"].sum(1)
    assert n == 500 and length % 16 == 0 and length - 16 < true_lengths.max() <= length < 128
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert out[key].dtype == np.int32 and out[key].shape == (n, length)
    assert np.array_equal(out["label"], ex.labels[:500])
    ids = out["input_ids"][0, : true_lengths[0]]
    assert tokenizer.decode(ids[1:-1]).strip() == ex.texts[0][0].strip()
    assert np.all(out["input_ids"][out["attention_mask"] == 0] == tokenizer.pad_token_id)


def test_load_pairs_share_one_bucket(glue_dir, minilm_dir):
    out = glue.load("rte", tokenizer=minilm_dir, data_dir=glue_dir, max_length=64)
    assert set(out) == {"train", "validation"}
    assert out["train"]["input_ids"].shape == (2490, 64)
    assert out["validation"]["input_ids"].shape == (277, 64)
    ids, mask, types = (
        out["validation"][k] for k in ("input_ids", "attention_mask", "token_type_ids")
    )
    last = mask.sum(1) - 1
    assert np.all(ids[np.arange(len(ids)), last] == 102)  # truncation keeps the final [SEP]
    assert np.all(types.max(1) == 1)  # a second segment is always present
    assert np.all(types[mask == 0] == 0)


def _fake_hub(monkeypatch, calls):
    datasets = pytest.importorskip("datasets")

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        cols = {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0], "idx": [0, 1]}
        return datasets.Dataset.from_dict(cols)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_hub_path_maps_columns_and_splits(monkeypatch):
    calls = []
    _fake_hub(monkeypatch, calls)
    ex = glue.read_examples("mnli_mismatched", "validation")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert ex.texts == (["p0", "p1"], ["h0", "h1"]) and ex.labels.tolist() == [2, 0]


def test_unreachable_hub_says_to_pass_data_dir(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"nyu-mll/glue.*Pass data_dir=<GLUE folder>"):
        glue.load("sst2", tokenizer=object())


def test_local_mnli_and_qqp_layouts(tmp_path):
    """MNLI and QQP are absent from shared/data: check their GLUE headers on small files."""
    (tmp_path / "MNLI").mkdir()
    head = "index\tpromptID\tpairID\tgenre\ts1_bp\ts2_bp\ts1_p\ts2_p\tsentence1\tsentence2"
    rows = [
        "0\t1\t1e\tfiction\t(\t(\t(\t(\tA man.\tA person.",
        "1\t2\t2c\tslate\t(\t(\t(\t(\tX.\tY.",
    ]
    dev = [head + "\tlabel1\tlabel2\tgold_label"]
    dev += [rows[0] + "\tentailment\tneutral\tentailment", rows[1] + "\tneutral\tc\tcontradiction"]
    (tmp_path / "MNLI" / "dev_mismatched.tsv").write_text("\n".join(dev) + "\n")
    (tmp_path / "MNLI" / "test_matched.tsv").write_text("\n".join([head, *rows]) + "\n")
    ex = glue.read_examples("mnli_mismatched", "dev", data_dir=tmp_path)
    assert ex.texts == (["A man.", "X."], ["A person.", "Y."]) and ex.labels.tolist() == [0, 2]
    assert glue.read_examples("mnli", "test", data_dir=tmp_path).labels.tolist() == [-1, -1]
    with pytest.raises(FileNotFoundError, match="dev_matched.tsv"):
        glue.read_examples("mnli", "validation", data_dir=tmp_path)
    (tmp_path / "glue" / "QQP").mkdir(parents=True)  # also found under data_dir/glue
    (tmp_path / "glue" / "QQP" / "dev.tsv").write_text(
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n7\t1\t2\tWhy?\tHow?\t1\n"
    )
    ex = glue.read_examples("QQP", "validation", data_dir=tmp_path)
    assert ex.texts == (["Why?"], ["How?"]) and ex.labels.tolist() == [1]
