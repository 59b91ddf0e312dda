"""The GLUE / SuperGLUE tasks read through the real TFDS builders, offline.

For each benchmark task a few rows are written in its builder's own source format (the files of its download),
the real `tfds` builder prepares them into a temporary data_dir with only the download manager's `download` /
`download_and_extract` patched to return those files (the mechanism of `tfds.testing.DatasetBuilderTestCase`), and
the project's seqio task reads them back. GCS look-ups and Python sockets are blocked, so nothing reaches the network.
"""
import csv
import json
import socket
from pathlib import Path
from unittest import mock

import pytest
import seqio
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import gcs_utils

from prompt_tuning_nb.data import tasks, vocab as vocab_lib

SPLITS = ("train", "validation", "test")
LENGTHS = {"inputs": 64, "targets": 8}

# Per task: its prefix and input fields, in the order T5 writes them.
FORMATS = {
    "glue_sst2": ("sst2", ("sentence",)),
    "glue_mrpc": ("mrpc", ("sentence1", "sentence2")),
    "glue_rte": ("rte", ("sentence1", "sentence2")),
    "super_glue_boolq": ("boolq", ("passage", "question")),
    "super_glue_cb": ("cb", ("hypothesis", "premise")),
}

# Per task: {split: [({field: text}, label word, or None for the unlabelled test split)]}.
ROWS = {
    "glue_sst2": {
        "train": [({"sentence": "a gripping and funny film"}, "positive"),
                  ({"sentence": "a dull , lifeless mess"}, "negative"),
                  ({"sentence": "warm , wise and moving"}, "positive"),
                  ({"sentence": "the plot never comes together"}, "negative")],
        "validation": [({"sentence": "an instant classic"}, "positive"),
                       ({"sentence": "tedious and far too long"}, "negative")],
        "test": [({"sentence": "a film for the ages"}, None), ({"sentence": "nothing works here"}, None)],
    },
    "glue_mrpc": {
        "train": [({"sentence1": "The bank raised its rates on Monday.",
                    "sentence2": "On Monday the bank increased its rates."}, "equivalent"),
                  ({"sentence1": "Shares fell 3 percent in early trading.",
                    "sentence2": "The company hired a new chief executive."}, "not_equivalent"),
                  ({"sentence1": "The storm closed schools across the state.",
                    "sentence2": "Schools across the state were shut by the storm."}, "equivalent")],
        "validation": [({"sentence1": "He won the race in record time.",
                         "sentence2": "He set a record while winning the race."}, "equivalent"),
                       ({"sentence1": "The museum opens at nine.",
                         "sentence2": "Tickets are sold out for the weekend."}, "not_equivalent")],
        "test": [({"sentence1": "The mayor spoke to reporters.", "sentence2": "Reporters heard from the mayor."},
                  None)],
    },
    "glue_rte": {
        "train": [({"sentence1": "Paris is the capital of France and its largest city.",
                    "sentence2": "Paris is in France."}, "entailment"),
                  ({"sentence1": "The cat slept on the sofa all afternoon.",
                    "sentence2": "The cat chased a mouse in the garden."}, "not_entailment"),
                  ({"sentence1": "Maria bought three apples and two pears.",
                    "sentence2": "Maria bought fruit."}, "entailment")],
        "validation": [({"sentence1": "The train left the station at noon.",
                         "sentence2": "The train never left the station."}, "not_entailment")],
        "test": [({"sentence1": "Rain fell all night in the valley.", "sentence2": "The valley got wet."}, None)],
    },
    "super_glue_boolq": {
        "train": [({"passage": "The Nile flows north into the Mediterranean Sea.",
                    "question": "does the nile flow north"}, "True"),
                  ({"passage": "Penguins are birds that cannot fly but swim well.",
                    "question": "can penguins fly"}, "False"),
                  ({"passage": "Water boils at 100 degrees Celsius at sea level.",
                    "question": "does water boil at 100 degrees celsius"}, "True")],
        "validation": [({"passage": "Mount Everest is the highest mountain above sea level.",
                         "question": "is everest the highest mountain"}, "True"),
                       ({"passage": "The moon has no atmosphere to speak of.",
                         "question": "does the moon have a thick atmosphere"}, "False")],
        "test": [({"passage": "Tomatoes are botanically fruits.", "question": "is a tomato a fruit"}, None)],
    },
    "super_glue_cb": {
        "train": [({"premise": "She said that the door was locked.", "hypothesis": "the door was locked"},
                   "entailment"),
                  ({"premise": "He never doubted that the plan would fail.", "hypothesis": "the plan would work"},
                   "contradiction"),
                  ({"premise": "I wonder whether they moved to Boston.", "hypothesis": "they moved to Boston"},
                   "neutral"),
                  ({"premise": "It is clear that the shop has closed.", "hypothesis": "the shop has closed"},
                   "entailment")],
        "validation": [({"premise": "Nobody believed that the river had flooded.",
                         "hypothesis": "the river had flooded"}, "neutral")],
        "test": [({"premise": "They knew that the bus was late.", "hypothesis": "the bus was late"}, None)],
    },
}


@pytest.fixture(scope="module")
def t5_vocab(fixtures_dir):
    """T5's SentencePiece vocabulary from the reference fixtures."""
    return vocab_lib.get_vocabulary(fixtures_dir / "t5_spiece.model")


# ---------------------------------------------------------------- source files, as the downloads hold them


def _write_tsv(path: Path, lines: list, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding=encoding, newline="") as f:
        csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n").writerows(lines)
    return path


def _write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _glue_folder(root: Path, folder: str, rows: dict, label_of, labelled_index: bool) -> Path:
    """`{folder}/train.tsv`, `dev.tsv` ([index,] fields, label) and `test.tsv` (index, fields), as in GLUE's zip."""
    fields = list(rows["train"][0][0])
    index = ["index"] if labelled_index else []
    for split, name in [("train", "train.tsv"), ("validation", "dev.tsv")]:
        _write_tsv(root / folder / name, [index + fields + ["label"]] +
                   [([i] if labelled_index else []) + [f[k] for k in fields] + [label_of(label)]
                    for i, (f, label) in enumerate(rows[split])])
    _write_tsv(root / folder / "test.tsv", [["index"] + fields] +
               [[i] + [f[k] for k in fields] for i, (f, _) in enumerate(rows["test"])])
    return root


def _sst2_download(root: Path, rows: dict) -> Path:
    return _glue_folder(root, "SST-2", rows, {"negative": 0, "positive": 1}.get, labelled_index=False)


def _rte_download(root: Path, rows: dict) -> Path:
    return _glue_folder(root, "RTE", rows, str, labelled_index=True)


def _mrpc_download(root: Path, rows: dict) -> dict:
    """Microsoft's two files (the training one, with a UTF-8 BOM, holds train and dev) and the dev ids list."""
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    quality = {"not_equivalent": 0, "equivalent": 1, None: 0}  # the builder ignores the test file's Quality
    lines = {split: [[quality[label], 1000 * n + 1, 1000 * n + 2, f["sentence1"], f["sentence2"]]
                     for n, (f, label) in enumerate(rows[split], start=100 * i)]
             for i, split in enumerate(SPLITS)}
    return {"train": _write_tsv(root / "msr_paraphrase_train.txt", [header] + lines["train"] + lines["validation"],
                                encoding="utf-8-sig"),
            "test": _write_tsv(root / "msr_paraphrase_test.txt", [header] + lines["test"]),
            "dev_ids": _write_tsv(root / "mrpc_dev_ids.tsv", [line[1:3] for line in lines["validation"]])}


def _super_glue_folder(root: Path, folder: str, rows: dict, label_of) -> Path:
    """`{folder}/train.jsonl`, `val.jsonl` and `test.jsonl` (no label), as in SuperGLUE's zip."""
    for split, name in [("train", "train.jsonl"), ("validation", "val.jsonl"), ("test", "test.jsonl")]:
        _write_jsonl(root / folder / name, [{**f, "idx": i, **({} if label is None else {"label": label_of(label)})}
                                            for i, (f, label) in enumerate(rows[split])])
    return root


def _boolq_download(root: Path, rows: dict) -> Path:
    return _super_glue_folder(root, "BoolQ", rows, lambda label: label == "True")


def _cb_download(root: Path, rows: dict) -> Path:
    return _super_glue_folder(root, "CB", rows, str)


DOWNLOADS = {"glue_sst2": _sst2_download, "glue_mrpc": _mrpc_download, "glue_rte": _rte_download,
             "super_glue_boolq": _boolq_download, "super_glue_cb": _cb_download}


# ---------------------------------------------------------------- preparing and reading


@pytest.fixture
def offline():
    """No GCS look-ups (TFDS's switch, set explicitly) and no Python socket connections."""
    no_connection = mock.Mock(side_effect=OSError("test tried to use the network"))
    with mock.patch.object(gcs_utils, "_is_gcs_disabled", True), \
            mock.patch.object(socket.socket, "connect", no_connection):
        yield
    assert not no_connection.called  # also when the caller swallowed the error


def _prepare(tfds_name: str, download_result, data_dir: Path) -> None:
    """Let the real builder prepare `download_result` (what its download manager returns) into `data_dir`."""
    def downloaded(manager, urls):
        return download_result

    with mock.patch.object(tfds.download.DownloadManager, "download", downloaded), \
            mock.patch.object(tfds.download.DownloadManager, "download_and_extract", downloaded):
        builder = tfds.builder(tfds_name, data_dir=str(data_dir))
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))


def _expected(name: str, rows: list) -> list:
    """Sorted `(inputs, targets)` of `rows` in T5's format, built here from the rows alone."""
    prefix, fields = FORMATS[name]
    return sorted((" ".join([prefix] + [f"{k}: {f[k]}" for k in fields]), label or "<unk>") for f, label in rows)


def _read_pretokenized(task, split: str) -> list:
    """Sorted `(inputs_pretokenized, targets_pretokenized)` of `split`."""
    ds = task.get_dataset(LENGTHS, split=split, shuffle=False, try_in_mem_cache=False)
    return sorted((x["inputs_pretokenized"].decode(), x["targets_pretokenized"].decode())
                  for x in ds.as_numpy_iterator())


def _read_model_features(task, split: str, vocab) -> list:
    """Sorted decoded `(encoder inputs, decoder targets)` of `split`, as the model is fed them."""
    ds = task.get_dataset(LENGTHS, split=split, shuffle=False, try_in_mem_cache=False)
    ds = seqio.EncDecFeatureConverter(pack=False)(ds, LENGTHS)
    return sorted((vocab.decode(x["encoder_input_tokens"].tolist()), vocab.decode(x["decoder_target_tokens"].tolist()))
                  for x in ds.as_numpy_iterator())


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", list(tasks.BENCHMARKS))
def test_benchmark_task_reads_rows_prepared_by_the_real_builder(name, tmp_path, t5_vocab):
    data_dir = tmp_path / "tfds"
    _prepare(tasks.BENCHMARKS[name].tfds_name, DOWNLOADS[name](tmp_path / "download", ROWS[name]), data_dir)
    task = tasks.task_info(name).build(name, t5_vocab)  # a fresh task: a task keeps the data_dir it first read
    task.source.tfds_dataset.override_data_dir(str(data_dir))
    read = {split: _read_pretokenized(task, split) for split in SPLITS}
    assert read == {split: _expected(name, ROWS[name][split]) for split in SPLITS}
    assert {targets for _, targets in read["train"]} == set(tasks.label_words(name))
    assert _read_model_features(task, "validation", t5_vocab) == read["validation"]
