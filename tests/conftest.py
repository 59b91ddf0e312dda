"""Shared pytest fixtures: where the original's artifacts live (skipping when they do not), and running the experiment notebooks."""
import os
from pathlib import Path

import papermill
import pytest

from prompt_tuning_nb.results import ResultsStore

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


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
                                          kernel_name="python3", parameters=parameters, cwd=str(EXPERIMENTS.parent),
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
