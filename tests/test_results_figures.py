"""The results store under concurrent writers, figures that plot the store's numbers, and the figures notebook."""
import json
import multiprocessing
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from prompt_tuning_nb import analysis
from prompt_tuning_nb.results import ResultsStore, ResultsStoreError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def figures():
    """`prompt_tuning_nb.figures`, imported lazily: the spawned writer processes import this file and need only the store."""
    from prompt_tuning_nb import figures
    return figures


WRITERS, ROWS_EACH, BATCH, ROUNDS = 8, 200, 20, 5


def _row(**overrides) -> dict:
    row = dict(experiment="scale", size="mini_s", method="prompt_tuning", task="movie_polarity", seed=0, steps=10,
               wall_time=0.5, num_params=1000, metrics={"accuracy": 0.5}, params={"prompt_length": 100})
    return {**row, **overrides}


def _writer_row(writer: int, i: int) -> dict:
    """Row `i` of `writer`: every field is derived from the two, so a reader can check a row is whole."""
    return _row(seed=writer * 1000 + i, steps=i, metrics={"accuracy": i / ROWS_EACH, "writer": writer},
                params={"writer": writer, "i": i}, code_version=f"writer-{writer}")


def _write(path: str, writer: int, start):
    """One writer process: open (maybe create) the store at the same moment as the others, then append 200 rows,
    one transaction per row (odd writers) or in transactions of `BATCH` rows (even writers)."""
    start.wait()
    store = ResultsStore(path)
    rows = [_writer_row(writer, i) for i in range(ROWS_EACH)]
    if writer % 2 == 0:
        for first in range(0, ROWS_EACH, BATCH):
            store.add_many(rows[first:first + BATCH])
    else:
        for row in rows:
            store.add(**row)


def _whole(row: dict) -> bool:
    """Whether a row read back is exactly the row its writer wrote."""
    writer, i = row["params"].get("writer"), row["params"].get("i")
    expected = _writer_row(writer, i)
    return all(row[name] == expected[name] for name in ("seed", "steps", "metrics", "params", "code_version")) and \
        row["experiment"] == "scale" and row["timestamp"]


def _read(path: str, start):
    """A reader polling while the writers write: it sees whole rows only, whole batches only, and never fewer."""
    start.wait()
    seen, deadline = 0, time.monotonic() + 120
    while seen < WRITERS * ROWS_EACH and time.monotonic() < deadline:
        try:
            rows = ResultsStore(path, create=False).rows(latest=False)
        except ResultsStoreError:  # not created yet, or the schema is still being written
            continue
        assert len(rows) >= seen, (len(rows), seen)
        assert all(_whole(row) for row in rows)
        per_writer = Counter(row["params"]["writer"] for row in rows)
        assert all(per_writer[w] % BATCH == 0 for w in range(0, WRITERS, 2)), per_writer
        seen = len(rows)
    assert seen == WRITERS * ROWS_EACH, seen


def test_concurrent_writers_lose_no_row(tmp_path):
    """8 processes released by one barrier create a fresh store and add 200 rows each, 5 times over."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold JAX threads
    for round_ in range(ROUNDS):
        path = str(tmp_path / f"round{round_}" / "results.sqlite")  # created by the racing writers themselves
        start = context.Barrier(WRITERS + 1)
        processes = [context.Process(target=_write, args=(path, w, start)) for w in range(WRITERS)]
        processes.append(context.Process(target=_read, args=(path, start)))
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=180)
        assert [process.exitcode for process in processes] == [0] * (WRITERS + 1), round_
        store = ResultsStore(path, create=False)
        rows = store.rows(latest=False)
        assert len(rows) == WRITERS * ROWS_EACH and all(_whole(row) for row in rows)
        assert sorted(row["seed"] for row in rows) == sorted(w * 1000 + i for w in range(WRITERS)
                                                             for i in range(ROWS_EACH))
        assert store._fetch("PRAGMA journal_mode")[0][0] == "wal"


def test_bad_paths_are_one_line_errors_and_write_nothing(tmp_path, figures):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, a folder nobody can write (not even root)")
    for path in (Path("/proc/results.sqlite"), Path("/proc/no/such/results.sqlite")):
        with pytest.raises(ResultsStoreError) as error:
            ResultsStore(path)
        assert "\n" not in str(error.value) and str(path) in str(error.value)
        assert not path.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ResultsStoreError, match="cannot create the folder"):
        ResultsStore(tmp_path / "file" / "results.sqlite")
    with pytest.raises(ResultsStoreError, match="no results store at"):
        figures.plot_scale(tmp_path / "missing.sqlite", tmp_path / "figures")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

    store = ResultsStore(tmp_path / "results.sqlite")
    store.add(**_row())
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        store.add_many([_row(seed=1), _row(seed=2, steps=-1)])
    assert len(store) == 1
    with pytest.raises(OSError, match="cannot write figure 'scale'") as error:
        figures.plot_scale(store, "/proc/figures")
    assert "\n" not in str(error.value)


MAJORITY = {"movie_polarity": 0.52, "spam": 0.87, "trec": 0.23}  # each task's majority-class accuracy, as stored
CHANCE = {"movie_polarity": 0.5, "spam": 0.5, "trec": 1 / 6}


def _known_store(path: Path) -> tuple:
    """A store of random scores, and the expected points computed here from the rows written (not read back)."""
    rng = np.random.default_rng(0)
    sizes = {"mini_xs": 1_300_000, "mini_s": 3_900_000, "mini_m": 15_000_000, "base": 247_577_856}
    rows, expected = [], {}
    for method, seeds, extra in (("model_tuning", 3, {}), ("prompt_tuning", 3, {"prompt_length": 100, "init": "class_label"}),
                                 ("prompt_design", 1, {"prompt": "Review: {text}"})):
        for size, n in sizes.items():
            per_seed = []
            for seed in range(seeds):
                scores = rng.uniform(0.4, 0.95, size=3)
                per_seed.append(scores)
                rows += [_row(size=size, num_params=n, method=method, task=task, seed=seed, params=extra,
                              metrics={"accuracy": float(score), "auc": float(1 - score), "majority_accuracy": MAJORITY[task],
                                       "chance_accuracy": CHANCE[task], "examples": 200})
                         for task, score in zip(MAJORITY, scores)]
            per_seed = np.array(per_seed)  # [seed, task]
            means = per_seed.mean(axis=1)
            expected.setdefault(method, []).append((n, means.mean(), means.min(), means.max()))
            for t, task in enumerate(MAJORITY):
                expected.setdefault((method, task), []).append(per_seed[:, t].mean())
    for length in (1, 20, 150):  # an ablation on the same store: it must not change Figure 1
        for size, n in sizes.items():
            for task in MAJORITY:
                score = float(rng.uniform(0.4, 0.95))
                rows.append(_row(size=size, num_params=n, task=task, params={"prompt_length": length, "init": "class_label"},
                                 metrics={"accuracy": score}))
                expected.setdefault(length, {}).setdefault(n, []).append(score)
    store = ResultsStore(path)
    store.add_many(rows)
    return store, expected


def test_figure_points_are_the_stores_numbers(tmp_path, figures):
    store, expected = _known_store(tmp_path / "results.sqlite")
    fig, data = figures.plot_scale(tmp_path / "results.sqlite", tmp_path / "figures")
    assert list(data["panels"]) == [*MAJORITY, "mean"]  # a panel per task, the mean as an extra one
    ax = fig.axes[3]  # the mean panel
    assert ax.get_title() == "mean over 3 tasks (movie_polarity, spam, trec)"
    drawn = {container.get_label(): container for container in ax.containers}
    for method, points in ((m, expected[m]) for m in ("model_tuning", "prompt_tuning", "prompt_design")):
        x, y, low, high = map(list, zip(*points))
        line = drawn[figures.METHODS[method]].lines[0]  # the Line2D of the errorbar container
        np.testing.assert_allclose(np.asarray(line.get_xdata(), dtype=float), x)  # errorbar keeps object arrays
        np.testing.assert_allclose(np.asarray(line.get_ydata(), dtype=float), y, rtol=1e-12)
        np.testing.assert_allclose([data["lines"][method]["low"], data["lines"][method]["high"]], [low, high], rtol=1e-12)
        if method != "prompt_design":  # error bars: from the lowest seed's mean to the highest's
            segments = drawn[figures.METHODS[method]].lines[2][0].get_segments()
            np.testing.assert_allclose([[s[0][1], s[1][1]] for s in segments], np.transpose([low, high]), rtol=1e-9)
        else:
            assert drawn[figures.METHODS[method]].has_yerr is False
        for t, task in enumerate(MAJORITY):  # each task's own panel: the mean over seeds of that task's scores
            np.testing.assert_allclose(data["panels"][task]["lines"][method]["y"], expected[method, task], rtol=1e-12)
    assert ax.get_legend().get_title().get_text() == "bars: lowest to highest seed"
    for task, panel_ax in zip(MAJORITY, fig.axes):
        assert data["panels"][task]["baselines"] == pytest.approx({"majority": MAJORITY[task], "chance": CHANCE[task]})
        assert panel_ax.get_ylim()[0] < CHANCE[task]  # the axis includes the chance line
    mean_baselines = {"majority": np.mean(list(MAJORITY.values())), "chance": np.mean(list(CHANCE.values()))}
    assert data["baselines"] == pytest.approx(mean_baselines)
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert f"majority class: {mean_baselines['majority']:.3f}" in legend and "uniform chance: 0.389" in legend
    assert ax.get_ylim()[0] < mean_baselines["chance"]
    assert data["caption"].endswith("validation accuracy, 200 examples per task, 10 training steps")
    assert ax.get_xscale() == "log"
    assert {p.name for p in data["files"]} == {"scale.png", "scale.svg"}
    svg = (tmp_path / "figures" / "scale.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and f"<title>{data['caption']}</title>" in svg

    fig, data = figures.plot_scale(store, None, metric="auc")  # another metric, same rows, no stored baselines
    np.testing.assert_allclose(data["lines"]["model_tuning"]["y"], [1 - y for _, y, _, _ in expected["model_tuning"]])
    assert data["baselines"] == {}

    fig, data = figures.plot_prompt_length(store, None)
    assert list(data["lines"]) == [1, 20, 100, 150]
    for length in (1, 20, 150):
        np.testing.assert_allclose(data["lines"][length]["y"], [np.mean(v) for v in expected[length].values()])
    np.testing.assert_allclose(data["lines"][100]["y"], [y for _, y, _, _ in expected["prompt_tuning"]])
    with pytest.raises(analysis.MissingResults, match="init ablation"):
        figures.plot_init(store, None)  # one init only


def test_recycling_bars_are_the_stores_success_rates(tmp_path, figures):
    store = analysis.example_store(tmp_path / "results.sqlite")
    rows = store.rows(experiment="recycling")
    baseline = {}
    for row in rows:
        if row["method"] in ("zero_shot", "random_prompt"):
            key = (row["size"], row["task"])
            baseline[key] = max(baseline.get(key, 0), row["metrics"]["accuracy"])
    fig, data = figures.plot_recycling(store, tmp_path / "figures")
    for recycler, bar in zip(analysis.RECYCLER_METHODS, fig.axes[0].patches):
        mine = [r for r in rows if r["method"] == recycler]
        rate = np.mean([r["metrics"]["accuracy"] > baseline[r["size"], r["task"]] for r in mine])
        assert bar.get_height() == pytest.approx(rate)
    table = (tmp_path / "figures" / "recycling.md").read_text()
    assert table.startswith("| recycler |")  # the baselines' numbers beside each success rate
    assert "| success_rate |" in table and "| zero_shot | random_prompt | unchanged | trained |" in table
    assert "| v2v-lin | 12 | 12 | 4 | 0.333 | 0.520 | 0.500 | 0.520 |  | 0.800 |" in table
    assert data["caption"] == "Prompt recycling: validation accuracy, 200 examples per task, 100 training steps"


def _execute(tmp_path: Path, results_db: Path, out_dir: Path) -> dict:
    papermill = pytest.importorskip("papermill")
    from jupyter_client.kernelspec import KernelSpecManager
    KernelSpecManager().get_kernel_spec("prompt_tuning_nb")  # registered in .venv by `make install`
    output = tmp_path / "figures_out.ipynb"
    try:
        papermill.execute_notebook(str(REPO / "experiments" / "figures.ipynb"), str(output), kernel_name="prompt_tuning_nb",
                                   parameters={"results_db": str(results_db), "out_dir": str(out_dir)},
                                   cwd=str(tmp_path), progress_bar=False)
    finally:
        executed = json.loads(output.read_text()) if output.exists() else None
    return executed


def _stdout(notebook: dict) -> str:
    texts = [output.get("text", "") for cell in notebook["cells"] for output in cell.get("outputs", [])
             if output.get("output_type") == "stream"]
    return "".join("".join(text) if isinstance(text, list) else text for text in texts)


def test_figures_notebook_through_papermill(tmp_path, figures):
    example = analysis.example_store(tmp_path / "example.sqlite")
    small = ResultsStore(tmp_path / "results.sqlite")  # the scale and recycling rows only: the SPoT figures skip
    small.add_many([{k: v for k, v in row.items() if k != "id"} for row in example.rows(experiment=["scale", "recycling"])])
    executed = _execute(tmp_path, tmp_path / "results.sqlite", tmp_path / "figures")
    drawn = {"scale", "prompt_length", "init", "recycling"}
    assert {p.name for p in (tmp_path / "figures").iterdir()} == \
        {f"{name}.{ext}" for name in drawn for ext in ("png", "svg")} | {"recycling.md"}
    printed = _stdout(executed)
    assert "skipped spot: no rows" in printed and "skipped spot_similarity: no task_similarity rows" in printed
    assert "4 of 6 figures drawn" in printed
    images = [o for cell in executed["cells"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == len(drawn)
    assert len(ResultsStore(tmp_path / "results.sqlite", create=False)) == len(small)  # read only


def test_figures_notebook_missing_store_is_one_line(tmp_path):
    papermill = pytest.importorskip("papermill")
    with pytest.raises(papermill.PapermillExecutionError) as error:
        _execute(tmp_path, tmp_path / "nowhere.sqlite", tmp_path / "figures")
    assert error.value.ename == "ResultsStoreError" and "no results store at" in error.value.evalue
    assert "\n" not in error.value.evalue
    assert not (tmp_path / "figures").exists() and not (tmp_path / "nowhere.sqlite").exists()
