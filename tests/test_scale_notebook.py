"""experiments/scale.ipynb: a smoke run through papermill fills the store and draws the figure; bad parameters stop it first."""
import os
import sqlite3
from pathlib import Path

import papermill
import pytest

from prompt_tuning_nb.results import ResultsStore

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "scale.ipynb"


def run(tmp_path, **parameters):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / "out.ipynb"), kernel_name="python3",
                                      parameters=parameters, cwd=str(NOTEBOOK.parents[1]), progress_bar=False)


def count_rows(db):
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT COUNT(*) FROM results").fetchone()[0]


@pytest.mark.slow
def test_smoke_run_writes_rows_and_the_figure(tmp_path):
    db, out = tmp_path / "results.sqlite", tmp_path / "out"
    run(tmp_path, smoke=True, results_db=str(db), out_dir=str(out))
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
def test_bad_parameters_stop_before_training_and_leave_the_store(tmp_path, parameters, message):
    db = tmp_path / "results.sqlite"
    ResultsStore(db).add(experiment="scale", size="mini_xs", method="prompt_design", task="rt_polarity", seed=0,
                         metrics={"accuracy": 0.5}, steps=0, wall_time=1.0)
    before = db.read_bytes()
    with pytest.raises(papermill.PapermillExecutionError) as error:
        run(tmp_path, **{"results_db": str(db), "out_dir": str(tmp_path / "out"), **parameters})
    assert message in error.value.evalue and "\n" not in error.value.evalue
    assert error.value.source.startswith("settings = experiment.check_settings")  # before any model was built
    assert count_rows(db) == 1 and db.read_bytes() == before
