"""experiments/spot.ipynb: a smoke run through papermill stores what its runs measured and draws both figures; bad
parameters stop it first."""
import itertools

import numpy as np
import pytest

from prompt_tuning_nb import experiment, spot_experiment
from prompt_tuning_nb.data import default_vocabulary
from prompt_tuning_nb.results import ResultsStore
from prompt_tuning_nb.zoo import pretrained_model

SETTINGS_CELL = "settings = spot_experiment.check_spot_settings"  # the cell that checks the parameters, before any model is built

SOURCES, TARGET = ("tweet_polarity", "trec"), "rt_polarity"  # short texts; the smoke setting trains 4 steps per run
MIXTURE = "mixture:" + ":".join(SOURCES)
MEASURE = "avg"  # the notebook's default similarity for retrieval
SMOKE = experiment.SMOKE  # what `smoke=True` trains: the size, the zoo recipe, steps, prompt length


def cosine(a_H, b_H) -> float:
    return float(a_H @ b_H / (np.linalg.norm(a_H) * np.linalg.norm(b_H)))


def similarity(a_PxH, b_QxH, measure: str) -> float:
    "SPoT's task similarity: the cosine of the mean tokens ('avg'), or the mean cosine over token pairs ('pairs')."
    if measure == "avg":
        return cosine(a_PxH.mean(axis=0), b_QxH.mean(axis=0))
    return float(np.mean([cosine(a_H, b_H) for a_H in a_PxH for b_H in b_QxH]))


def ranking_report(ranking, gains):
    "The retrieval metrics of a ranking (most similar first) of sources by their transfer gains."
    gains_S = np.array([gains[source] for source in ranking])
    rank_of_best = int(np.argmax(gains_S)) + 1  # the first of equal gains
    return {"retrieval_rank_of_best": float(rank_of_best), "retrieval_top1_is_best": float(rank_of_best == 1),
            "retrieval_regret": float(gains_S.max() - gains_S[0])}


@pytest.mark.slow
def test_smoke_run_writes_rows_and_the_figures(tmp_path, run_experiment, eval_data, score_prompt, check_prompt_tuning,
                                               check_model_tuning):
    db, out = tmp_path / "results.sqlite", tmp_path / "out"
    run_experiment("spot", smoke=True, source_tasks=",".join(SOURCES), target_tasks=TARGET, results_db=str(db),
                   out_dir=str(out))
    rows = ResultsStore(db).rows(experiment="spot")
    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    assert set(by_method) == {"prompt_tuning", "model_tuning", "spot_mixture", "spot_transfer", "spot_retrieved",
                              "task_similarity"}
    assert {row["task"] for row in by_method["prompt_tuning"]} == {*SOURCES, MIXTURE, TARGET}
    assert {row["params"]["source"] for row in by_method["spot_transfer"]} == set(SOURCES)
    assert [row["params"]["source"] for row in by_method["spot_mixture"]] == [MIXTURE, MIXTURE]
    for name in ("spot.png", "spot.svg", "spot_similarity.png", "spot_similarity.svg"):
        assert (out / name).stat().st_size > 0
    exported = out.glob("*/numpy_checkpoints/checkpoint_*/encoder.prompt.prompt.prompt")
    assert len({path.parents[2].name for path in exported}) == 2 + 1 + 1 + 1 + 2  # every prompt-tuning run

    config, params, _ = pretrained_model(SMOKE["size"], SMOKE["zoo_recipe"], progress=False)
    vocab = default_vocabulary()
    data = {task: eval_data([task], vocab) for task in (*SOURCES, TARGET)}
    data[MIXTURE] = eval_data(SOURCES, vocab)  # the sources' examples in turn, labelled by the union of their words

    def rows_of(method, task=TARGET, source=None):
        "`{split: row}` of `method` on `task`, its prompt started from `source`'s."
        return {row["split"]: row for row in by_method[method]
                if row["task"] == task and row["params"].get("source") == source}

    def check(method, task=TARGET, source=None):
        "The rows of `method` on `task` (from `source`) against what their run left in its folder."
        run_dir = out / (f"{SMOKE['size']}-seed0-{task}-{method}" + (f"-from-{source}" if source else ""))
        check_run = check_model_tuning if method == "model_tuning" else check_prompt_tuning
        return check_run(rows_of(method, task, source), run_dir, config, params, data[task])

    tuned = {task: check("prompt_tuning", task) for task in (*SOURCES, MIXTURE, TARGET)}
    check("model_tuning")
    transfers = {**{source: check("spot_transfer", source=source) for source in SOURCES},
                 MIXTURE: check("spot_mixture", source=MIXTURE)}
    for source, run in transfers.items():  # each started from the source's best prompt
        start = score_prompt(config, params, tuned[source].prompts[tuned[source].best_step], data[TARGET].validation,
                             data[TARGET].candidates)
        assert run.evaluations[0] == pytest.approx(start, abs=1e-6)

    learned = {task: tuned[task].prompts[SMOKE["steps"]] for task in (TARGET, *SOURCES)}  # the last prompts
    similarities = {}  # (measure, the two tasks) -> cosine: one row per pair, a task with itself too
    for row in by_method["task_similarity"]:
        pair = (row["params"]["measure"], frozenset((row["task"], row["params"]["source"])))
        assert pair not in similarities and row["steps"] == 0
        similarities[pair] = row["metrics"]["cosine"]
    assert similarities == pytest.approx({(measure, frozenset((a, b))): similarity(learned[a], learned[b], measure)
                                          for measure in ("avg", "pairs")
                                          for a, b in itertools.combinations_with_replacement(learned, 2)}, abs=1e-6)
    assert all(similarities["avg", frozenset((task,))] == pytest.approx(1.0, abs=1e-6) for task in learned)

    ranking = sorted(SOURCES, key=lambda source: -similarity(learned[TARGET], learned[source], MEASURE))
    retrieved, baseline = rows_of("spot_retrieved", source=ranking[0]), rows_of("prompt_tuning")
    assert len(by_method["spot_retrieved"]) == len(retrieved) == 2
    for split, row in retrieved.items():
        transferred = {source: rows_of("spot_transfer", source=source)[split]["metrics"] for source in SOURCES}
        gains = {source: transferred[source]["accuracy"] - baseline[split]["metrics"]["accuracy"] for source in SOURCES}
        expected = {**transferred[ranking[0]], **ranking_report(ranking, gains),
                    "retrieval_cosine": similarity(learned[TARGET], learned[ranking[0]], MEASURE)}
        assert row["params"]["measure"] == MEASURE
        assert {name: row["metrics"][name] for name in expected} == pytest.approx(expected, abs=1e-6)


def test_bad_parameters_stop_the_notebook_in_its_settings_cell_and_leave_the_store(assert_stops_at_settings):
    assert_stops_at_settings("spot", {"size": "mini_huge"}, "parameter size='mini_huge'", SETTINGS_CELL)


@pytest.mark.parametrize("parameters, message", [
    ({"steps": 0}, "parameter steps=0"),
    ({"source_tasks": ""}, "parameter source_tasks='': expected at least one task"),
    ({"source_tasks": "trec,imdb"}, "parameter source_tasks='imdb'"),
    ({"source_tasks": "trec,rt_polarity", "target_tasks": "rt_polarity"}, "parameter target_tasks='rt_polarity'"),
    ({"out_dir": "/proc/not_writable"}, "parameter out_dir='/proc/not_writable'"),
])
def test_bad_parameters_are_refused_with_one_line_errors(assert_settings_refuse, parameters, message):
    assert_settings_refuse("spot", parameters, message, SETTINGS_CELL, {"spot_experiment": spot_experiment})
