"""experiments/scale.ipynb: a smoke run through papermill fills the store and draws the figure; bad parameters stop it first."""
import pytest

from prompt_tuning_nb.results import ResultsStore


@pytest.mark.slow
def test_smoke_run_writes_rows_and_the_figure(tmp_path, run_experiment):
    db, out = tmp_path / "results.sqlite", tmp_path / "out"
    run_experiment("scale", smoke=True, results_db=str(db), out_dir=str(out))
    rows = ResultsStore(db).rows()
    assert len(rows) == 2 * 3 * 2  # (validation, test) x 3 methods x 2 tasks
    assert {row["method"] for row in rows} == {"model_tuning", "prompt_tuning", "prompt_design"}
    assert all(0.0 <= row["metrics"]["accuracy"] <= 1.0 for row in rows)
    assert (out / "scale.png").stat().st_size > 0 and (out / "scale.svg").stat().st_size > 0


@pytest.mark.parametrize("parameters, message", [
    ({"size": "mini_huge"}, "parameter size='mini_huge'"),
    ({"tasks": "rt_polarity,imdb"}, "parameter tasks='imdb'"),
    ({"steps": 0}, "parameter steps=0"),
    ({"size": "base", "checkpoint_dir": "/nonexistent/{size}"}, "a T5X checkpoint folder for size 'base'"),
    ({"out_dir": "/proc/not_writable"}, "parameter out_dir='/proc/not_writable'"),
])
def test_bad_parameters_stop_before_training_and_leave_the_store(assert_stops_at_settings, parameters, message):
    assert_stops_at_settings("scale", parameters, message, "settings = experiment.check_settings")
