"""experiments/ablations.ipynb: a smoke run through papermill stores one row per trained prompt and per ensemble, each
rescored here from what the run exported, and draws both ablation figures; bad parameters stop it first."""
import numpy as np
import pytest

from prompt_tuning_nb import family
from prompt_tuning_nb.data import default_vocabulary
from prompt_tuning_nb.experiment import SMOKE
from prompt_tuning_nb.results import ResultsStore
from prompt_tuning_nb.training.evaluation import score_candidates
from prompt_tuning_nb.zoo import pretrained_model

from conftest import EVAL_BATCH, read_run

SETTINGS_CELL = "settings = ablations.check_ablation_settings"
SMOKE_RUN = dict(smoke=True, prompt_lengths="1,4", inits="random_uniform,class_label", ensemble_seeds="0,1,2")
POINTS = [(1, "class_label", 0), (4, "class_label", 0), (4, "random_uniform", 0), (4, "class_label", 1),
          (4, "class_label", 2)]  # the smoke run's prompts: its central point is the smoke setting's P = 4


@pytest.mark.slow
def test_smoke_run_rescores_every_prompt_and_the_ensemble(tmp_path, run_experiment, eval_data, score_prompt):
    db, out = tmp_path / "results.sqlite", tmp_path / "out"
    run_experiment("ablations", results_db=str(db), out_dir=str(out), **SMOKE_RUN)
    rows = ResultsStore(db).rows(experiment="ablations")
    tuned = {(r["params"]["prompt_length"], r["params"]["init"], r["seed"], r["split"]): r
             for r in rows if r["method"] == "prompt_tuning"}
    assert sorted({key[:3] for key in tuned}) == sorted(POINTS)
    config, params, _ = pretrained_model(SMOKE["size"], SMOKE["zoo_recipe"], progress=False)
    data = eval_data(["rt_polarity"], default_vocabulary())
    best = {}
    for length, init, seed in POINTS:
        run = read_run(out / f"mini_xs-rt_polarity-P{length}-{init}-seed{seed}", SMOKE["steps"], SMOKE["eval_every"])
        best[length, init, seed] = run.prompts[run.best_step]
        assert best[length, init, seed].shape == (length, config.d_model)
        for split in ("validation", "test"):
            row = tuned[length, init, seed, split]
            assert row["trainable_params"] == length * config.d_model and row["steps"] == SMOKE["steps"]
            assert row["metrics"] == pytest.approx(score_prompt(config, params, best[length, init, seed],
                                                                getattr(data, split), data.candidates), abs=1e-6)

    members = [best[4, "class_label", seed] for seed in (0, 1, 2)]  # the ensemble, voted here with numpy
    for split in ("validation", "test"):
        inputs, labels = getattr(data, split)
        chosen = np.stack([np.argmax(score_candidates(config, family.with_prompt(config, params, prompt), inputs,
                                                      data.candidates, batch_size=EVAL_BATCH), axis=1)
                           for prompt in members])
        voted = np.array([np.bincount(column, minlength=2).argmax() for column in chosen.T])
        alone = [np.mean(c == labels) for c in chosen]
        row = [r for r in rows if r["method"] == "prompt_ensemble" and r["split"] == split][0]
        assert row["params"]["members"] == [0, 1, 2]
        assert row["metrics"]["accuracy"] == pytest.approx(np.mean(voted == labels), abs=1e-9)
        assert row["metrics"]["average_accuracy"] == pytest.approx(np.mean(alone), abs=1e-9)
        assert row["metrics"]["best_accuracy"] == pytest.approx(max(alone), abs=1e-9)
    for name in ("prompt_length", "init"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.svg").stat().st_size > 0


def test_bad_parameters_stop_the_notebook_in_its_settings_cell_and_leave_the_store(assert_stops_at_settings):
    assert_stops_at_settings("ablations", {"ensemble_seeds": "0,1"}, "parameter ensemble_seeds='0,1'", SETTINGS_CELL)


@pytest.mark.parametrize("parameters, message", [
    ({"prompt_lengths": "1,0"}, "parameter prompt_lengths='1,0': expected distinct positive integers"),
    ({"inits": "class_label,zeros"}, "parameter inits='zeros'"),
    ({"tasks": "no_such_task"}, "parameter tasks='no_such_task'"),
    ({"prompt_length": 0}, "parameter prompt_length=0"),
])
def test_bad_parameters_are_refused_in_process(assert_settings_refuse, parameters, message):
    from prompt_tuning_nb import ablations
    assert_settings_refuse("ablations", parameters, message, SETTINGS_CELL, {"ablations": ablations})
