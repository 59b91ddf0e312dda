"""experiments/spot.ipynb: a smoke run through papermill fills the store and draws both figures; bad parameters stop it first."""
import pytest

from prompt_tuning_nb.results import ResultsStore

SOURCES, TARGET = ("tweet_polarity", "trec"), "rt_polarity"  # short texts; the smoke setting trains 4 steps per run


@pytest.mark.slow
def test_smoke_run_writes_rows_and_the_figures(tmp_path, run_experiment):
    db, out = tmp_path / "results.sqlite", tmp_path / "out"
    run_experiment("spot", smoke=True, source_tasks=",".join(SOURCES), target_tasks=TARGET, results_db=str(db),
                   out_dir=str(out))
    rows = ResultsStore(db).rows(experiment="spot")
    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    assert set(by_method) == {"prompt_tuning", "model_tuning", "spot_mixture", "spot_transfer", "spot_retrieved",
                              "task_similarity"}
    mixture = "mixture:" + ":".join(SOURCES)
    assert {row["task"] for row in by_method["prompt_tuning"]} == {*SOURCES, mixture, TARGET}
    assert {row["params"]["source"] for row in by_method["spot_transfer"]} == set(SOURCES)
    assert [row["params"]["source"] for row in by_method["spot_mixture"]] == [mixture, mixture]
    retrieved = by_method["spot_retrieved"]
    assert len(retrieved) == 2 and retrieved[0]["params"]["source"] in SOURCES
    assert retrieved[0]["metrics"]["retrieval_rank_of_best"] in (1.0, 2.0)
    # (target and the two sources, with themselves) x (avg, pairs)
    assert len(by_method["task_similarity"]) == 6 * 2
    assert all(0.0 <= row["metrics"]["accuracy"] <= 1.0 for row in rows if row["method"] != "task_similarity")
    for name in ("spot.png", "spot.svg", "spot_similarity.png", "spot_similarity.svg"):
        assert (out / name).stat().st_size > 0
    exported = out.glob("*/numpy_checkpoints/checkpoint_*/encoder.prompt.prompt.prompt")
    assert len({path.parents[2].name for path in exported}) == 2 + 1 + 1 + 1 + 2  # every prompt-tuning run


@pytest.mark.parametrize("parameters, message", [
    ({"size": "mini_huge"}, "parameter size='mini_huge'"),
    ({"steps": 0}, "parameter steps=0"),
    ({"source_tasks": ""}, "parameter source_tasks='': expected at least one task"),
    ({"source_tasks": "trec,imdb"}, "parameter source_tasks='imdb'"),
    ({"source_tasks": "trec,rt_polarity", "target_tasks": "rt_polarity"}, "parameter target_tasks='rt_polarity'"),
    ({"out_dir": "/proc/not_writable"}, "parameter out_dir='/proc/not_writable'"),
])
def test_bad_parameters_stop_before_training_and_leave_the_store(assert_stops_at_settings, parameters, message):
    assert_stops_at_settings("spot", parameters, message, "settings = spot_experiment.check_spot_settings")
