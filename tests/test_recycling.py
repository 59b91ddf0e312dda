"""Prompt recycling: recyclers on exactly related tables, identity recycling, errors, and the CLI on the tiny T5X fixture."""
import json

import numpy as np
import pytest

from prompt_tuning_nb.formats.prompt_files import load_prompt
from prompt_tuning_nb.recycling import (LinComb, RecyclingError, V2VLin, V2VNN, fit_recycler, load_recycler,
                                        load_word_list, make_recycler, save_recycler, select_word_ids,
                                        sentencepiece_words, word_list_overlap)
from prompt_tuning_nb.recycling.run_recycle import load_embeddings, main, recycle

RNG = np.random.default_rng(0)
SOURCE_VxHs = RNG.normal(size=(400, 16)).astype(np.float32)
MAP_HsxHt = RNG.normal(size=(16, 12)).astype(np.float32) / 4
TARGET_VxHt = SOURCE_VxHs @ MAP_HsxHt  # a target model whose table is an exact linear map of the source's
PROMPT_PxHs = RNG.normal(size=(7, 16)).astype(np.float32)
WORDS = select_word_ids(range(400), num_words=300, word_offset=50)


@pytest.mark.parametrize("name", ["v2v-lin", "lin-comb"])
def test_least_squares_recyclers_recover_a_linear_map(name):
    recycler = fit_recycler(name, SOURCE_VxHs, TARGET_VxHt, WORDS)
    np.testing.assert_allclose(recycler(PROMPT_PxHs), PROMPT_PxHs @ MAP_HsxHt, atol=1e-4, rtol=1e-4)


def test_v2v_nn_approximates_a_linear_map():
    recycler = fit_recycler("v2v-nn", SOURCE_VxHs, TARGET_VxHt, WORDS, learning_rate=3e-3, epochs=150)
    wanted = PROMPT_PxHs @ MAP_HsxHt
    relative = np.abs(recycler(PROMPT_PxHs) - wanted).mean() / np.abs(wanted).mean()
    assert relative < 0.2, relative
    assert recycler.losses[-1] < 0.05 * recycler.losses[0]


def test_v2v_nn_defaults_are_the_papers():
    recycler = make_recycler("v2v-nn")
    assert (recycler.hidden_scale, recycler.batch_size, recycler.learning_rate, recycler.epochs) == (4, 50, 3e-4, 25)
    fitted = recycler.fit(SOURCE_VxHs[:120], TARGET_VxHt[:120])
    assert fitted.params["hidden"]["kernel"].shape == (16, 48) and fitted.losses.shape == (25,)


@pytest.mark.parametrize("name", ["v2v-lin", "lin-comb", "v2v-nn"])
def test_identical_models_give_back_the_prompt(name):
    settings = {"learning_rate": 3e-3, "epochs": 150} if name == "v2v-nn" else {}
    recycled = fit_recycler(name, SOURCE_VxHs, SOURCE_VxHs, WORDS, **settings)(PROMPT_PxHs)
    tolerance = 0.2 if name == "v2v-nn" else 1e-4
    assert np.abs(recycled - PROMPT_PxHs).mean() / np.abs(PROMPT_PxHs).mean() < tolerance


def test_lin_comb_and_v2v_lin_agree_on_unrelated_tables():
    noise_VxHt = RNG.normal(size=(400, 12)).astype(np.float32)
    np.testing.assert_allclose(LinComb().fit(SOURCE_VxHs, noise_VxHt)(PROMPT_PxHs),
                               V2VLin().fit(SOURCE_VxHs, noise_VxHt)(PROMPT_PxHs), atol=1e-4)


@pytest.mark.parametrize("recycler", [V2VLin(), LinComb(), V2VNN(epochs=2)])
def test_save_and_load_round_trip(tmp_path, recycler):
    recycler.fit(SOURCE_VxHs[:100], TARGET_VxHt[:100])
    loaded = load_recycler(save_recycler(tmp_path / "r.npz", recycler))
    assert type(loaded) is type(recycler) and loaded.widths == (16, 12)
    np.testing.assert_array_equal(loaded(PROMPT_PxHs), recycler(PROMPT_PxHs))
    assert [p.name for p in tmp_path.iterdir()] == ["r.npz"]


def test_errors_are_one_line():
    with pytest.raises(RecyclingError, match="share one vocabulary") as e:
        fit_recycler("v2v-lin", SOURCE_VxHs, TARGET_VxHt[:399], WORDS)
    assert "\n" not in str(e.value)
    recycler = V2VLin().fit(SOURCE_VxHs, TARGET_VxHt)
    with pytest.raises(RecyclingError, match=r"prompt width 12 \(shape \(7, 12\)\) is not the source model's width 16"):
        recycler(PROMPT_PxHs[:, :12])
    with pytest.raises(RecyclingError, match=r"has 400 words, too few for entries \[1000, 5000\)"):
        select_word_ids(range(400))
    with pytest.raises(RecyclingError, match="unknown recycler"):
        make_recycler("v2v-xx")


def test_paper_word_list_and_sentencepiece_filter(fixtures_dir):
    paper = load_word_list(fixtures_dir / "recycling" / "filtered-vocab-english-only.json")
    assert len(paper) == 16779 and paper[8] == "the"
    ids = select_word_ids(paper)
    assert (len(ids), ids[0], ids[-1]) == (4000, 1494, 7991)
    ours = sentencepiece_words(fixtures_dir / "t5_spiece.model")
    assert all(w.isascii() and w.isalpha() and len(w) >= 3 for w in ours.values())
    overlap = word_list_overlap(ours, paper)
    assert overlap["shared"] == 12861 and overlap["window_shared"] == 3112


def test_load_embeddings_reads_only_the_table(fixtures_dir):
    table = load_embeddings(fixtures_dir / "t5x_tiny_checkpoint" / "checkpoint_3")
    assert table.shape == (32128, 4) and table.dtype == np.float32


def test_cli_on_the_tiny_t5x_checkpoint(fixtures_dir, tmp_path, capsys):
    checkpoint = str(fixtures_dir / "t5x_tiny_checkpoint" / "checkpoint_3")
    prompt = RNG.normal(size=(5, 4)).astype(np.float32)
    np.save(tmp_path / "prompt.npy", prompt)
    words = str(fixtures_dir / "recycling" / "filtered-vocab-english-only.json")
    common = ["--source_model", checkpoint, "--target_model", checkpoint, "--prompt_path", str(tmp_path / "prompt.npy")]
    for name in ("v2v-lin", "lin-comb"):
        out = main(common + ["--output_path", str(tmp_path / name), "--recycler", name, "--filtered_word", words])
        np.testing.assert_allclose(load_prompt(out), prompt, atol=1e-4)
    out = main(common + ["--output_path", str(tmp_path / "nn" / "encoder.prompt.prompt.prompt"),
                         "--vocab", str(fixtures_dir / "t5_spiece.model"), "--num_words", "500", "--word_offset", "100",
                         "--epochs", "2", "--save_recycler", str(tmp_path / "nn.npz")])
    assert load_prompt(out).shape == (5, 4)
    np.testing.assert_array_equal(load_recycler(tmp_path / "nn.npz")(prompt), load_prompt(out))
    assert "v2v-nn-recycled prompt (5, 4)" in capsys.readouterr().out


def test_cli_errors(fixtures_dir, tmp_path, capsys):
    checkpoint = str(fixtures_dir / "t5x_tiny_checkpoint" / "checkpoint_3")
    np.save(tmp_path / "wide.npy", np.ones((5, 6), np.float32))
    np.save(tmp_path / "small_table.npy", np.ones((100, 4), np.float32))
    words = str(fixtures_dir / "recycling" / "filtered-vocab-english-only.json")
    cases = [(["--prompt_path", str(tmp_path / "wide.npy")], "prompt width 6 (shape (5, 6)) is not the source model's width 4"),
             (["--target_model", str(tmp_path / "small_table.npy")], "recycling assumes both models share one vocabulary"),
             (["--word_offset", "15000"], "the filtered vocabulary has 16779 words, too few for entries [15000, 19000)")]
    for change, expected in cases:
        argv = {"--source_model": checkpoint, "--target_model": checkpoint, "--prompt_path": str(tmp_path / "wide.npy"),
                "--output_path": str(tmp_path / "out.npy"), "--filtered_word": words, "--recycler": "v2v-lin"}
        argv.update(dict(zip(change[::2], change[1::2])))
        if change[0] != "--prompt_path":
            np.save(tmp_path / "ok.npy", np.ones((5, 4), np.float32))
            argv["--prompt_path"] = str(tmp_path / "ok.npy")
        with pytest.raises(SystemExit) as exit_info:
            main([x for kv in argv.items() for x in kv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.startswith("run_recycle: error: ") and err.count("\n") == 1, err
        assert expected in err, err
    assert not (tmp_path / "out.npy").exists()


def test_recycle_function_with_a_word_list_file(tmp_path):
    np.save(tmp_path / "source.npy", SOURCE_VxHs)
    np.save(tmp_path / "target.npy", TARGET_VxHt)
    np.save(tmp_path / "prompt.npy", PROMPT_PxHs)
    (tmp_path / "words.json").write_text(json.dumps({str(i): f"w{i}" for i in range(0, 400, 2)}))
    recycled, fitted = recycle(tmp_path / "source.npy", tmp_path / "target.npy", tmp_path / "prompt.npy", "v2v-lin",
                               num_words=150, word_offset=20, filtered_word=tmp_path / "words.json")
    np.testing.assert_allclose(recycled, PROMPT_PxHs @ MAP_HsxHt, atol=1e-4)
    assert fitted.widths == (16, 12)


@pytest.mark.slow
def test_unchanged_prompt_rows_score_each_source_prompt_on_the_other_model(tmp_path, monkeypatch):
    """`run_recycling` measures the identity, the source's prompt used as it is, on a target whose embedding table has
    the same shape: two random `mini_xs` stand in for a model and its update (the smoke run of the notebook checks
    that models of different widths get no such rows)."""
    import jax

    from prompt_tuning_nb import models, t5
    from prompt_tuning_nb.experiment import load_task
    from prompt_tuning_nb.recycling import experiment as recycling

    from conftest import read_run

    config = t5.T5Config.from_preset("mini_xs", dtype="float32")  # `load_model("mini_xs")` would pretrain the zoo's
    random_models = {name: models.LoadedModel(config, jax.device_get(t5.init_params(config, jax.random.key(seed))),
                                              f"preset:mini_xs seed {seed}")
                     for name, seed in (("mini_xs", 0), ("mini_xs@seed1", 1))}
    monkeypatch.setattr(recycling, "load_model",  # the run's zoo models, as random presets
                        lambda size, zoo_recipe=None, progress=True: random_models[recycling.model_name(size, zoo_recipe.seed)])
    settings = recycling.check_recycling_settings("mini_xs,mini_xs@seed1", "rt_polarity", "v2v-lin", steps=2,
                                                  eval_every=2, batch_size=4, inputs_length=32, max_eval_examples=16,
                                                  prompt_length=3, num_words=200, word_offset=10,
                                                  results_db=tmp_path / "r.sqlite", out_dir=tmp_path / "out")
    rows = recycling.run_recycling(settings, progress=False)
    unchanged = {(r["params"]["source"], r["size"], r["split"]): r for r in rows if r["method"] == "unchanged_prompt"}
    assert len(unchanged) == 4
    data = load_task("rt_polarity", random_models["mini_xs"].vocabulary, settings.training)
    for source, target in (("mini_xs", "mini_xs@seed1"), ("mini_xs@seed1", "mini_xs")):
        run = read_run(tmp_path / "out" / f"{source}-rt_polarity-prompt_tuning-seed0", 2, 2)
        expected = recycling.evaluate_prompt(random_models[target].config, random_models[target].params,
                                             run.prompts[run.best_step], data)
        for split in ("validation", "test"):
            assert unchanged[source, target, split]["metrics"] == pytest.approx(expected[split], abs=1e-6)
    assert not np.array_equal(*(load_prompt(tmp_path / "out" / f"{name}-rt_polarity-prompt_tuning-seed0" / "numpy_checkpoints"
                                            / "checkpoint_2" / "encoder.prompt.prompt.prompt") for name in random_models))
