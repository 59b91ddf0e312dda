"""Shared pytest fixtures: where the original's artifacts live (skipping when they do not), running the experiment
notebooks, and measuring again what a smoke run wrote. Every test session loads this file, so the fixtures import the
model and data modules (seconds each) themselves."""
import json
import math
import os
import typing
from pathlib import Path

import numpy as np
import papermill
import pytest

from prompt_tuning_nb.results import ResultsStore

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
EVAL_BATCH = 64  # the experiments' evaluation batch: the same compiled program, so the same scores bit for bit
PROMPT_FILE = "encoder.prompt.prompt.prompt"  # the prompt's name in a run's numpy_checkpoints/checkpoint_{step}/


LONGEST_FIRST = ("test_smollm2_prompt_tuning.py", "test_multihost.py", "test_smollm2_scale_experiment.py", "test_gemma.py",
                 "test_scale_notebook.py", "test_sharding.py", "test_recycling_notebook.py", "test_gin_cli.py",
                 "test_spot_notebook.py", "test_ablations_notebook.py")  # measured, longest first (a fresh clone, two workers)


def pytest_collection_modifyitems(items):
    """The longest files first: `make test` deals files to two workers in this order (`-n 2 --dist loadfile
    --no-loadscope-reorder`), so the run does not end on one long file while the other worker waits."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """`../shared/fixtures` beside the checkout; the test is skipped when it is absent."""
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture
def run_experiment(tmp_path):
    """`run(name, **parameters)`: execute `experiments/{name}.ipynb` through papermill from the repository root."""
    def run(name: str, **parameters):
        return papermill.execute_notebook(str(EXPERIMENTS / f"{name}.ipynb"), str(tmp_path / f"{name}.out.ipynb"),
                                          kernel_name="prompt_tuning_nb", parameters=parameters, cwd=str(EXPERIMENTS.parent),
                                          progress_bar=False)
    return run


@pytest.fixture
def assert_stops_at_settings(tmp_path, run_experiment):
    """`check(name, parameters, message, settings_cell)`: the notebook stops in the cell whose source starts with
    `settings_cell`, with a one-line error containing `message`, and its store (one row) is left byte for byte."""
    def check(name: str, parameters: dict, message: str, settings_cell: str):
        db = tmp_path / "results.sqlite"
        ResultsStore(db).add(experiment=name, size="mini_xs", method="prompt_tuning", task="rt_polarity", seed=0,
                             metrics={"accuracy": 0.5}, steps=4, wall_time=1.0)
        before = db.read_bytes()
        with pytest.raises(papermill.PapermillExecutionError) as error:
            run_experiment(name, **{"results_db": str(db), "out_dir": str(tmp_path / "out"), **parameters})
        assert message in error.value.evalue and "\n" not in error.value.evalue
        assert error.value.source.startswith(settings_cell)  # before any model was built
        assert len(ResultsStore(db, create=False)) == 1 and db.read_bytes() == before
    return check


def _code_cells(name: str) -> list:
    "`(source, tags)` of each code cell of `experiments/{name}.ipynb`."
    cells = json.loads((EXPERIMENTS / f"{name}.ipynb").read_text())["cells"]
    return [("".join(c["source"]), c.get("metadata", {}).get("tags", [])) for c in cells if c["cell_type"] == "code"]


@pytest.fixture
def assert_settings_refuse(tmp_path):
    """`check(name, parameters, message, settings_cell, namespace)`: the notebook's settings cell, run in this process
    on its parameters cell's defaults overridden by `parameters`, raises a one-line error containing `message` and
    leaves the store (one row) byte for byte. `namespace` gives the names the cell uses (its modules). The kernel-level
    path (papermill stopping in that cell) is checked once per notebook by `assert_stops_at_settings`."""
    def check(name: str, parameters: dict, message: str, settings_cell: str, namespace: dict):
        db = tmp_path / "results.sqlite"
        ResultsStore(db).add(experiment=name, size="mini_xs", method="prompt_tuning", task="rt_polarity", seed=0,
                             metrics={"accuracy": 0.5}, steps=4, wall_time=1.0)
        before = db.read_bytes()
        cells = _code_cells(name)
        values = dict(namespace)
        exec(next(source for source, tags in cells if "parameters" in tags), values)
        values.update({"results_db": str(db), "out_dir": str(tmp_path / "out"), **parameters})
        with pytest.raises(ValueError) as error:
            exec(next(source for source, _ in cells if source.startswith(settings_cell)), values)
        assert message in str(error.value) and "\n" not in str(error.value)
        assert len(ResultsStore(db, create=False)) == 1 and db.read_bytes() == before
    return check


class EvalData(typing.NamedTuple):
    "The examples a smoke run evaluates a task (or a mixture of tasks) on, rebuilt from the tokenized splits."
    label_words: tuple  # class id -> label word
    candidates: np.ndarray  # `[C, L]` the label words' tokens with EOS, zero-padded
    validation: tuple  # (inputs `[N, T]`, labels `[N]`)
    test: tuple  # (inputs, labels)


def label_tokens(vocab, words) -> np.ndarray:
    "`[C, L]` the tokens of each word with EOS, zero-padded."
    encoded = [list(vocab.encode(word)) + [1] for word in words]
    tokens_CxL = np.zeros((len(encoded), max(map(len, encoded))), np.int32)
    for row, ids in enumerate(encoded):
        tokens_CxL[row, :len(ids)] = ids
    return tokens_CxL


@pytest.fixture
def eval_data():
    """`load(tasks, vocab) -> EvalData`: the first `max_eval_examples` validation and test examples of each of `tasks`
    in turn, at the smoke setting's input length, each labelled by the one label word its target tokens spell."""
    from prompt_tuning_nb.data import label_words, task_arrays
    from prompt_tuning_nb.experiment import SMOKE

    def load(tasks, vocab) -> EvalData:
        words = tuple(dict.fromkeys(word for task in tasks for word in label_words(task)))
        candidates = label_tokens(vocab, words)

        def split(name):
            inputs, labels = [], []
            for task in tasks:
                lengths = {"inputs": SMOKE["inputs_length"], "targets": label_tokens(vocab, label_words(task)).shape[1]}
                arrays = task_arrays(task, name, lengths, vocab=vocab)
                targets = arrays["decoder_target_tokens"][:SMOKE["max_eval_examples"]]
                targets = np.pad(targets, ((0, 0), (0, candidates.shape[1] - targets.shape[1])))
                matches_NxC = (targets[:, None, :] == candidates[None]).all(axis=-1)
                assert (matches_NxC.sum(axis=1) == 1).all()
                inputs.append(arrays["encoder_input_tokens"][:SMOKE["max_eval_examples"]])
                labels.append(matches_NxC.argmax(axis=1))
            return np.concatenate(inputs), np.concatenate(labels)
        return EvalData(words, candidates, split("validation"), split("test"))
    return load


@pytest.fixture
def notebook_compilation_cache():
    "JAX's persistent compilation cache in the folder the experiment notebooks fill, for one test: their programs load."
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    from prompt_tuning_nb.data import cache_dir

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    compilation_cache.reset_cache()
    jax.config.update(names[0], str(cache_dir("jax")))
    jax.config.update(names[1], 1.0)
    yield
    compilation_cache.reset_cache()
    for name, value in previous.items():
        jax.config.update(name, value)


@pytest.fixture
def score_prompt(notebook_compilation_cache):
    """`score(config, params, prompt_PxH, (inputs, labels), candidates)`: rank-classification metrics of the model
    with `prompt_PxH` (None: no prompt) in front of the inputs, non-finite ones as None (as the store keeps them)."""
    from prompt_tuning_nb import family
    from prompt_tuning_nb.training.evaluation import classification_metrics, score_candidates

    def score(config, params, prompt_PxH, split, candidates):
        inputs, labels = split
        prompted = params if prompt_PxH is None else family.with_prompt(config, params, np.asarray(prompt_PxH, np.float32))
        metrics = classification_metrics(score_candidates(config, prompted, inputs, candidates, batch_size=EVAL_BATCH),
                                          labels)
        return {name: value if math.isfinite(value) else None for name, value in metrics.items()}
    return score


class TrainedRun(typing.NamedTuple):
    "What one training run left in its folder."
    evaluations: list  # validation metrics (step and split removed), oldest first
    best: dict  # the first evaluation with the highest accuracy: what early stopping on accuracy keeps
    best_step: int  # its step
    prompts: dict  # step -> the exported prompt `[P, H]` of that step (empty for model tuning)


def read_run(run_dir: Path, steps: int, eval_every: int) -> TrainedRun:
    "The `TrainedRun` in `run_dir`, which must have evaluated at step 0 and every `eval_every` steps up to `steps`."
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validation = [record for record in records if record["split"] == "validation"]
    assert [record["step"] for record in validation] == list(range(0, steps + 1, eval_every))
    evaluations = [{k: v for k, v in record.items() if k not in ("step", "split")} for record in validation]
    best = max(range(len(evaluations)), key=lambda i: evaluations[i]["accuracy"])  # the first of equals
    exported = sorted((run_dir / "numpy_checkpoints").glob(f"checkpoint_*/{PROMPT_FILE}"))
    prompts = {int(path.parent.name.removeprefix("checkpoint_")): np.load(path) for path in exported}
    return TrainedRun(evaluations, evaluations[best], validation[best]["step"], prompts)


@pytest.fixture
def check_prompt_tuning(score_prompt):
    """`check(rows, run_dir, config, params, data) -> TrainedRun`: the `{split: row}` of a smoke prompt-tuning run
    record its steps and sizes, and the scores, on `data`'s splits, of the best prompt it exported."""
    from prompt_tuning_nb import family
    from prompt_tuning_nb.experiment import SMOKE

    def check(rows, run_dir, config, params, data):
        run = read_run(run_dir, SMOKE["steps"], SMOKE["eval_every"])
        assert set(run.prompts) == {run.best_step, SMOKE["steps"]}  # the best prompt and the last one
        assert rows["validation"]["metrics"] == pytest.approx(run.best, abs=1e-6)
        for split, inputs_labels in (("validation", data.validation), ("test", data.test)):
            row = rows[split]
            assert row["steps"] == SMOKE["steps"] and row["num_params"] == family.num_params(config)
            assert row["trainable_params"] == SMOKE["prompt_length"] * config.d_model
            best = score_prompt(config, params, run.prompts[run.best_step], inputs_labels, data.candidates)
            assert row["metrics"] == pytest.approx(best, abs=1e-6)
        return run
    return check


@pytest.fixture
def check_model_tuning(score_prompt):
    """`check(rows, run_dir, config, params, data)`: the `{split: row}` of a smoke model-tuning run record its steps
    and sizes and its best evaluation, which started from the pretrained model, and accuracies that count examples of
    `data`'s splits."""
    from prompt_tuning_nb import family
    from prompt_tuning_nb.experiment import SMOKE

    def check(rows, run_dir, config, params, data):
        run = read_run(run_dir, SMOKE["steps"], SMOKE["eval_every"])
        assert not run.prompts
        assert run.evaluations[0] == pytest.approx(score_prompt(config, params, None, data.validation, data.candidates),
                                                   abs=1e-6)
        assert rows["validation"]["metrics"] == pytest.approx(run.best, abs=1e-6)
        for split, (_, labels) in (("validation", data.validation), ("test", data.test)):
            row = rows[split]
            assert row["steps"] == SMOKE["steps"]
            assert row["trainable_params"] == row["num_params"] == family.num_params(config)
            correct = row["metrics"]["accuracy"] * len(labels)
            assert correct == pytest.approx(round(correct), abs=1e-6)  # a count of the evaluated examples
    return check


# ----- Comparisons with transformers (tests/test_gguf.py, test_llama_exactness.py, test_gemma.py) -----

TASK_TEXTS = {"rt_polarity": 10568, "trec": 5952}  # every text these two offline tasks are built from (before dedup)


@pytest.fixture(scope="session")
def task_texts() -> list:
    "The cleaned texts of the two tasks' source files, as `data.corpora` reads them (their splits hold a subset)."
    from prompt_tuning_nb.data.corpora import CORPORA

    return [example.text for name in TASK_TEXTS for example in CORPORA[name].reader()]


def assert_same_ids_on_texts(vocab, reference_tokenizer, texts: list):
    "`vocab` encodes every text as the transformers tokenizer does (also through `encode_tf`) and decodes it back."
    import tensorflow as tf

    assert len(texts) == sum(TASK_TEXTS.values())
    theirs = reference_tokenizer(texts, add_special_tokens=False)["input_ids"]
    differ = [text for text, ids in zip(texts, theirs) if vocab.encode(text) != ids]
    assert not differ, f"{len(differ)} of {len(texts)} texts differ, e.g. {differ[0]!r}"
    for text, ids in zip(texts, theirs):
        assert vocab.decode(ids) == text == reference_tokenizer.decode(ids, skip_special_tokens=True)
    sample = texts[::100]
    assert vocab.encode_tf(tf.constant(sample)).to_list() == [theirs[i] for i in range(0, len(texts), 100)]


def relative_error(ours, reference) -> float:
    "Largest absolute difference over the reference's largest magnitude, in float64."
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return np.abs(ours - reference).max() / np.abs(reference).max()


def right_padded(rows, pad: int) -> tuple:
    "`(tokens_BxT, lengths_B)` of lists of ids, padded after their end with `pad`."
    lengths = np.array([len(row) for row in rows])
    tokens = np.full((len(rows), lengths.max()), pad, np.int32)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = row
    return tokens, lengths


def valid_BxT(lengths_B, length: int) -> np.ndarray:
    "True at each row's positions before its length."
    return np.arange(length)[None, :] < lengths_B[:, None]


def torch_long(x):
    "A torch int64 tensor of `x` (token ids, masks)."
    import torch

    return torch.from_numpy(np.asarray(x, dtype=np.int64))
