"""experiments/recycling.ipynb: a smoke run through papermill fills the store and draws the figure; bad parameters stop it first."""
import pytest

from prompt_tuning_nb.results import ResultsStore


@pytest.mark.slow
def test_smoke_run_writes_rows_and_the_figure(tmp_path, run_experiment):
    db, out = tmp_path / "results.sqlite", tmp_path / "out"
    run_experiment("recycling", smoke=True, tasks="rt_polarity", results_db=str(db), out_dir=str(out))
    rows = ResultsStore(db).rows(experiment="recycling")
    models = {"mini_xs", "mini_s"}  # the smoke setting: two sizes pretrained by a tiny recipe
    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    assert set(by_method) == {"prompt_tuning", "zero_shot", "random_prompt", "v2v-nn", "v2v-lin", "lin-comb"}
    for method in ("prompt_tuning", "zero_shot", "random_prompt"):  # one per model, (validation, test)
        assert {row["size"] for row in by_method[method]} == models and len(by_method[method]) == 2 * 2
    for recycler in ("v2v-nn", "v2v-lin", "lin-comb"):  # each model's prompt recycled to the other
        assert {(row["params"]["source"], row["size"]) for row in by_method[recycler]} == {
            ("mini_xs", "mini_s"), ("mini_s", "mini_xs")}
    assert all(0.0 <= row["metrics"]["accuracy"] <= 1.0 for row in rows)
    assert len(list((out / "recycled").glob("*.npy"))) == 2 * 3
    for name in ("recycling.png", "recycling.svg", "recycling.md"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize("parameters, message", [
    ({"models": "mini_xs,mini_huge"}, "parameter models='mini_huge'"),
    ({"tasks": "rt_polarity,imdb"}, "parameter tasks='imdb'"),
    ({"steps": 0}, "parameter steps=0"),
    ({"recyclers": "v2v-lin,v2v-rnn"}, "parameter recyclers='v2v-rnn'"),
    ({"word_offset": 3000}, "the filtered vocabulary has 5999 words"),
    ({"out_dir": "/proc/not_writable"}, "parameter out_dir='/proc/not_writable'"),
])
def test_bad_parameters_stop_before_training_and_leave_the_store(assert_stops_at_settings, parameters, message):
    assert_stops_at_settings("recycling", parameters, message, "settings = check_recycling_settings")
