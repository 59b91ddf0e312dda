"""experiments/scale.ipynb: a smoke run through papermill stores what its runs measured and draws the figure; bad
parameters stop it first."""
import numpy as np
import pytest

from prompt_tuning_nb import experiment, family
from prompt_tuning_nb.data import default_vocabulary
from prompt_tuning_nb.results import ResultsStore
from prompt_tuning_nb.zoo import pretrained_model

SETTINGS_CELL = "settings = experiment.check_settings"  # the cell that checks the parameters, before any model is built

SMOKE = experiment.SMOKE  # what `smoke=True` trains: the size, the zoo recipe, steps, prompt length
TASKS = ("rt_polarity", "trec")  # the notebook's default tasks


INSTRUCTIONS = {"rt_polarity": "Answer with the sentiment of the text: negative or positive.\n\n",
                "trec": "Answer with the answer type of the text: description, entity, abbreviation, human, number or "
                        "location.\n\n"}  # prompt design's hand-written instructions, as the notebook must write them


def designed_inputs(vocab, text, inputs_NxT):
    "The inputs with a hand-written prompt in front."
    prompt_ids = np.asarray(vocab.encode(text), np.int32)
    return np.concatenate([np.tile(prompt_ids, (len(inputs_NxT), 1)), inputs_NxT], axis=1)


@pytest.mark.slow
def test_smoke_run_writes_rows_and_the_figure(tmp_path, run_experiment, eval_data, score_prompt, check_prompt_tuning,
                                              check_model_tuning):
    db, out = tmp_path / "results.sqlite", tmp_path / "out"
    run_experiment("scale", smoke=True, results_db=str(db), out_dir=str(out))
    rows = ResultsStore(db).rows()
    assert len(rows) == 2 * 4 * 2  # (validation, test) x 4 methods x 2 tasks
    assert {row["method"] for row in rows} == {"model_tuning", "prompt_tuning", "prompt_design", "few_shot"}
    assert {row["task"] for row in rows} == set(TASKS)
    assert (out / "scale.png").stat().st_size > 0 and (out / "scale.svg").stat().st_size > 0

    config, params, _ = pretrained_model(SMOKE["size"], SMOKE["zoo_recipe"], progress=False)
    vocab = default_vocabulary()
    for task in TASKS:
        data = eval_data([task], vocab)
        runs = {method: {row["split"]: row for row in rows if (row["task"], row["method"]) == (task, method)}
                for method in ("model_tuning", "prompt_tuning", "prompt_design", "few_shot")}
        folder = {method: out / f"{SMOKE['size']}-{task}-{method}-pretrained-seed0" for method in runs}
        check_prompt_tuning(runs["prompt_tuning"], folder["prompt_tuning"], config, params, data)
        check_model_tuning(runs["model_tuning"], folder["model_tuning"], config, params, data)
        context = experiment.demonstrations(task, vocab, 1, seed=0)
        assert context.startswith(INSTRUCTIONS[task]) and len(context) > len(INSTRUCTIONS[task])
        for method, text in (("prompt_design", INSTRUCTIONS[task]), ("few_shot", context)):
            for split, (inputs, labels) in (("validation", data.validation), ("test", data.test)):
                row = runs[method][split]  # trains nothing: the scores of the hand-written prompt
                assert row["steps"] == 0 and row["trainable_params"] == 0 and row["num_params"] == family.num_params(config)
                designed = (designed_inputs(vocab, text, inputs), labels)
                scores = score_prompt(config, params, None, designed, data.candidates)
                assert row["metrics"] == pytest.approx(scores, abs=1e-6)
        for split, (_, labels) in (("validation", data.validation), ("test", data.test)):
            for method in runs:  # the split's own baselines, stored with every row for the figures
                metrics = runs[method][split]["metrics"]
                assert metrics["majority_accuracy"] == pytest.approx(np.bincount(labels).max() / len(labels))
                assert (metrics["chance_accuracy"], metrics["examples"]) == (pytest.approx(1 / len(data.label_words)), len(labels))
    caption = f"test accuracy, {len(data.test[1])} examples per task, {SMOKE['steps']} training steps"
    assert f"<title>Model tuning, prompt tuning and prompt design: {caption}</title>" in (out / "scale.svg").read_text()


def test_bad_parameters_stop_the_notebook_in_its_settings_cell_and_leave_the_store(assert_stops_at_settings):
    assert_stops_at_settings("scale", {"size": "mini_huge"}, "parameter size='mini_huge'", SETTINGS_CELL)


@pytest.mark.parametrize("parameters, message", [
    ({"tasks": "rt_polarity,imdb"}, "parameter tasks='imdb'"),
    ({"steps": 0}, "parameter steps=0"),
    ({"size": "base", "checkpoint_dir": "/nonexistent/{size}"}, "a T5X checkpoint folder for size 'base'"),
    ({"out_dir": "/proc/not_writable"}, "parameter out_dir='/proc/not_writable'"),
])
def test_bad_parameters_are_refused_with_one_line_errors(assert_settings_refuse, parameters, message):
    assert_settings_refuse("scale", parameters, message, SETTINGS_CELL, {"experiment": experiment})
