"""experiments/recycling.ipynb: a smoke run through papermill stores what its prompts score and draws the figure; bad
parameters stop it first."""
import itertools

import numpy as np
import pytest

from prompt_tuning_nb import experiment, family
from prompt_tuning_nb.data import default_vocabulary
from prompt_tuning_nb.recycling import experiment as recycling
from prompt_tuning_nb.recycling.run_recycle import word_ids_for
from prompt_tuning_nb.results import ResultsStore
from prompt_tuning_nb.zoo import pretrained_model

SETTINGS_CELL = "settings = check_recycling_settings"  # the cell that checks the parameters, before any model is built

SMOKE = experiment.SMOKE  # what `smoke=True` trains: the zoo recipe, steps, prompt length
MODELS = ("mini_xs", "mini_s")  # the smoke setting: two sizes pretrained by a tiny recipe
TASK = "rt_polarity"
RECYCLERS = ("v2v-nn", "v2v-lin", "lin-comb")


def least_squares_recycled(prompt_PxHs, source_VxHs, target_VxHt, word_ids):
    "v2v-lin by its definition: the prompt through the least-squares map from source to target word embeddings."
    map_HsxHt, *_ = np.linalg.lstsq(np.asarray(source_VxHs, np.float64)[word_ids],
                                    np.asarray(target_VxHt, np.float64)[word_ids], rcond=None)
    return prompt_PxHs @ map_HsxHt


@pytest.mark.slow
def test_smoke_run_writes_rows_and_the_figure(tmp_path, run_experiment, eval_data, score_prompt, check_prompt_tuning):
    db, out = tmp_path / "results.sqlite", tmp_path / "out"
    run_experiment("recycling", smoke=True, tasks=TASK, results_db=str(db), out_dir=str(out))
    rows = ResultsStore(db).rows(experiment="recycling")
    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    assert set(by_method) == {"prompt_tuning", "zero_shot", "random_prompt", *RECYCLERS}  # no unchanged_prompt:
    # the two models' embedding tables differ in width (test_recycling.py measures one)
    for method in ("prompt_tuning", "zero_shot", "random_prompt"):  # one per model, (validation, test)
        assert {row["size"] for row in by_method[method]} == set(MODELS) and len(by_method[method]) == 2 * 2
    for recycler in RECYCLERS:  # each model's prompt recycled to the other
        assert {(row["params"]["source"], row["size"]) for row in by_method[recycler]} == {
            ("mini_xs", "mini_s"), ("mini_s", "mini_xs")}
    assert len(list((out / "recycled").glob("*.npy"))) == 2 * 3
    for name in ("recycling.png", "recycling.svg", "recycling.md"):
        assert (out / name).stat().st_size > 0

    data = eval_data([TASK], default_vocabulary())
    zoo = {name: pretrained_model(*recycling.model_recipe(name, SMOKE["zoo_recipe"]), progress=False)
           for name in MODELS}  # name -> (config, params, info)
    table = {name: params["token_embedder"]["embedding"] for name, (_, params, _) in zoo.items()}

    def rows_of(method, name, source=None):
        "`{split: row}` of `method` on model `name` (its prompt recycled from `source`)."
        return {row["split"]: row for row in by_method[method]
                if row["size"] == name and row["params"].get("source") == source}

    def check_scores(rows, name, prompt_PxH):
        "The rows of an untrained measurement on model `name` score `prompt_PxH` (None: no prompt)."
        config, params, _ = zoo[name]
        assert set(rows) == {"validation", "test"}
        for split, inputs_labels in (("validation", data.validation), ("test", data.test)):
            assert rows[split]["steps"] == 0 and rows[split]["trainable_params"] == 0
            assert rows[split]["num_params"] == family.num_params(config)
            scores = score_prompt(config, params, prompt_PxH, inputs_labels, data.candidates)
            assert rows[split]["metrics"] == pytest.approx(scores, abs=1e-6)

    best = {}  # model -> the best prompt trained on it, which the baselines and recyclers start from
    for name, (config, params, _) in zoo.items():
        run = check_prompt_tuning(rows_of("prompt_tuning", name), out / f"{name}-{TASK}-prompt_tuning-seed0", config,
                                  params, data)
        best[name] = run.prompts[run.best_step]
        check_scores(rows_of("zero_shot", name), name, None)
        norm = np.linalg.norm(best[name])
        random_PxH = recycling.random_prompt_like(best[name], 0)  # drawn with the prompt-tuning seed
        assert random_PxH.shape == best[name].shape and np.linalg.norm(random_PxH) == pytest.approx(norm, rel=1e-6)
        random_rows = rows_of("random_prompt", name)
        assert all(row["params"]["norm"] == pytest.approx(norm, rel=1e-6) for row in random_rows.values())
        check_scores(random_rows, name, random_PxH)

    word_ids = word_ids_for(len(table[MODELS[0]]), recycling.SMOKE["num_words"], recycling.SMOKE["word_offset"])
    for (source, target), recycler in itertools.product(itertools.permutations(MODELS, 2), RECYCLERS):
        recycled_PxH = np.load(out / "recycled" / f"{source}-to-{target}-{TASK}-{recycler}-seed0.npy")
        assert recycled_PxH.dtype == np.float32
        assert recycled_PxH.shape == (SMOKE["prompt_length"], zoo[target][0].d_model)  # the target's width
        if recycler == "v2v-lin":
            expected_PxH = least_squares_recycled(best[source], table[source], table[target], word_ids)
            np.testing.assert_allclose(recycled_PxH, expected_PxH, rtol=1e-4, atol=1e-5)
        check_scores(rows_of(recycler, target, source), target, recycled_PxH)


def test_bad_parameters_stop_the_notebook_in_its_settings_cell_and_leave_the_store(assert_stops_at_settings):
    assert_stops_at_settings("recycling", {"models": "mini_xs,mini_huge"}, "parameter models='mini_huge'",
                             SETTINGS_CELL)


@pytest.mark.parametrize("parameters, message", [
    ({"tasks": "rt_polarity,imdb"}, "parameter tasks='imdb'"),
    ({"steps": 0}, "parameter steps=0"),
    ({"recyclers": "v2v-lin,v2v-rnn"}, "parameter recyclers='v2v-rnn'"),
    ({"word_offset": 27000}, "the filtered vocabulary has 30570 words"),  # SmolLM2's, the default models'
    ({"out_dir": "/proc/not_writable"}, "parameter out_dir='/proc/not_writable'"),
])
def test_bad_parameters_are_refused_with_one_line_errors(assert_settings_refuse, parameters, message):
    assert_settings_refuse("recycling", parameters, message, SETTINGS_CELL,
                           {"check_recycling_settings": recycling.check_recycling_settings})
