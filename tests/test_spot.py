"""SPoT: prompt transfer between runs, prompt similarity as task embeddings, source retrieval and its evaluation."""
import io

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prompt_tuning_nb
from prompt_tuning_nb import plotting, spot
from prompt_tuning_nb.formats.prompt_files import (load_prompt, save_npy_prompt, save_peft_prompt,
                                                   save_t5x_numpy_prompt)
from prompt_tuning_nb.prompts import Prompt

CONFIGS = prompt_tuning_nb.__path__[0] + "/configs/prompts"
RNG = jax.random.key(0)
RELEASED = ("sst2", "mrpc", "rte")


def random_prompts(names, shape=(7, 16), seed=0):
    """Named random prompts with an offset so their means are not near zero."""
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape) + rng.normal(size=shape[1]) for name in names}


# --- transfer ----------------------------------------------------------------

def source_run(model_dir, step=1200, shape=(10, 8)):
    """A 'source run': trains (here: draws) a float32 prompt and exports it as the original code does."""
    prompt = np.asarray(jax.random.normal(jax.random.key(7), shape) * 40, np.float32)
    return prompt, save_t5x_numpy_prompt(model_dir, step, prompt)


def target_run(prompt_file, shape=(10, 8), **kwargs):
    """A 'target run': a fresh Prompt module whose parameter starts from `prompt_file`."""
    module = Prompt(shape[0], shape[1], spot.transfer_initializer(prompt_file, **kwargs))
    return np.asarray(module.init(jax.random.key(123))["params"]["prompt"])


def test_exported_prompt_loads_bit_identical_in_another_run(tmp_path):
    prompt, exported = source_run(tmp_path / "source")
    assert exported == tmp_path / "source/numpy_checkpoints/checkpoint_1200/encoder.prompt.prompt.prompt"
    loaded = load_prompt(exported)
    assert loaded.dtype == np.float32 and loaded.tobytes() == prompt.tobytes()
    started = target_run(exported)
    assert started.dtype == np.float32 and started.tobytes() == prompt.tobytes()
    # the step folder, and the jitted initializer, give the same bits
    assert target_run(exported.parent).tobytes() == prompt.tobytes()
    jitted = jax.jit(spot.transfer_initializer(exported), static_argnums=1)(RNG, (10, 8))
    assert np.asarray(jitted).tobytes() == prompt.tobytes()


@pytest.mark.parametrize("save", ["npy", "peft"])
def test_transfer_from_other_formats(tmp_path, save):
    prompt = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    path = save_npy_prompt(tmp_path / "p.npy", prompt) if save == "npy" else save_peft_prompt(tmp_path / "peft", prompt)
    assert target_run(path).tobytes() == prompt.tobytes()


def test_gin_from_file_matches_transfer_initializer(tmp_path):
    prompt, exported = source_run(tmp_path / "source")
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([f"{CONFIGS}/from_file.gin"], [f"PROMPT_FILE = '{exported}'"])
        init = gin.query_parameter("%PROMPT_INIT").scoped_configurable_fn()
        assert np.asarray(init(RNG, (10, 8))).tobytes() == prompt.tobytes()
    finally:
        gin.clear_config()


def test_resize_is_explicit():
    prompt = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(spot.transfer_initializer(prompt, 2, resize="truncate")(RNG, (2, 3)), prompt[:2])
    np.testing.assert_array_equal(spot.transfer_initializer(prompt, 6, resize="tile")(RNG, (6, 3)),
                                  prompt[[0, 1, 2, 3, 0, 1]])
    np.testing.assert_array_equal(spot.transfer_initializer(prompt, 4)(RNG, (4, 3)), prompt)
    assert spot.transfer_initializer(prompt)(RNG, (4, 3), jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("build, shape, message", [
    (lambda p: spot.transfer_initializer(p), (4, 5), "has width 3 but the model's prompt width is 5"),
    (lambda p: spot.transfer_initializer(p), (6, 3), "gives 4 rows but the model's prompt length is 6"),
    (lambda p: spot.transfer_initializer(p, 2), None, "has 4 rows but the target prompt_length is 2"),
    (lambda p: spot.transfer_initializer(p, 6, resize="truncate"), None, "cannot truncate"),
    (lambda p: spot.transfer_initializer(p, resize="stretch"), None, "resize must be one of"),
    (lambda p: spot.transfer_initializer(p, 0), None, "prompt_length must be a positive int"),
    (lambda p: spot.transfer_initializer(p[0]), None, "expected a floating [P, d_model] array"),
])
def test_transfer_errors_are_one_line(build, shape, message):
    prompt = np.arange(12, dtype=np.float32).reshape(4, 3)
    with pytest.raises(ValueError) as error:
        init = build(prompt)
        init(RNG, shape)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_source_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        spot.transfer_initializer(tmp_path / "nope")


# --- similarity --------------------------------------------------------------

@pytest.mark.parametrize("measure", spot.MEASURES)
def test_similarity_is_symmetric(measure):
    prompts = random_prompts("abcd")
    prompts["e"] = np.random.default_rng(9).normal(size=(3, 16))  # another length
    matrix = spot.similarity_matrix(prompts, measure)
    assert matrix.shape == (5, 5)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
    assert (matrix <= 1 + 1e-12).all() and (matrix >= -1 - 1e-12).all()
    assert spot.prompt_similarity(prompts["a"], prompts["e"], measure) == pytest.approx(
        spot.prompt_similarity(prompts["e"], prompts["a"], measure))


def test_avg_similarity_is_one_on_the_diagonal():
    np.testing.assert_allclose(np.diag(spot.similarity_matrix(random_prompts("abcd"))), 1.0, atol=1e-12)


def test_pairs_diagonal_is_mean_self_cosine():
    prompt = random_prompts("a")["a"]
    unit = prompt / np.linalg.norm(prompt, axis=1, keepdims=True)
    assert spot.prompt_similarity(prompt, prompt, "pairs") == pytest.approx((unit @ unit.T).mean())
    parallel = np.outer(np.arange(1, 6), np.ones(16))  # all tokens point one way
    assert spot.prompt_similarity(parallel, parallel, "pairs") == pytest.approx(1.0)


def test_avg_similarity_is_invariant_to_token_order():
    prompts = random_prompts("ab")
    shuffled = np.random.default_rng(1).permutation(prompts["a"])
    assert not np.array_equal(shuffled, prompts["a"])
    for measure in spot.MEASURES:
        assert spot.prompt_similarity(shuffled, prompts["b"], measure) == pytest.approx(
            spot.prompt_similarity(prompts["a"], prompts["b"], measure), abs=1e-12)
    assert spot.prompt_similarity(shuffled, prompts["a"]) == pytest.approx(1.0)


def test_measures_match_their_definitions():
    prompts = random_prompts("ab")
    a, b = prompts["a"], prompts["b"]
    cos = lambda u, v: u @ v / np.linalg.norm(u) / np.linalg.norm(v)
    assert spot.prompt_similarity(a, b, "avg") == pytest.approx(cos(a.mean(0), b.mean(0)))
    assert spot.prompt_similarity(a, b, "pairs") == pytest.approx(np.mean([[cos(u, v) for v in b] for u in a]))


# --- retrieval ---------------------------------------------------------------

@pytest.mark.parametrize("measure", spot.MEASURES)
def test_identical_prompt_twin_ranks_first(measure):
    prompts = random_prompts(["target", "near", "far", "other"], seed=3)
    prompts["near"] = prompts["target"] + 0.5 * np.random.default_rng(4).normal(size=prompts["target"].shape)
    prompts["twin"] = prompts["target"].copy()
    ranking = spot.rank_sources("target", ["near", "far", "twin", "other"], prompts, measure)
    assert [name for name, _ in ranking][:2] == ["twin", "near"]
    assert sorted(name for name, _ in ranking) == ["far", "near", "other", "twin"]
    scores = [score for _, score in ranking]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(spot.prompt_similarity(prompts["target"], prompts["target"], measure))


@pytest.mark.parametrize("candidates, prompts_change, message", [
    (["b", "a"], {}, "the target 'a' is among the candidate sources"),
    ([], {}, "no candidate sources for target 'a'"),
    (["b", "zz"], {}, "no prompt for ['zz']"),
    (["b", "b"], {}, "candidates repeat a task"),
    ("b", {}, "got the single string"),
    (["b", "c"], {"c": np.ones((7, 8))}, "prompts have different widths"),
])
def test_rank_sources_errors_are_one_line(candidates, prompts_change, message):
    prompts = {**random_prompts("abc"), **prompts_change}
    with pytest.raises(ValueError) as error:
        spot.rank_sources("a", candidates, prompts)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_similarity_errors_are_one_line():
    for call, message in [
        (lambda: spot.prompt_similarity(np.ones((3, 4)), np.ones((3, 5))), "different widths"),
        (lambda: spot.similarity_matrix({"a": np.ones((3, 4)), "b": np.ones((2, 6))}), "'a' (3, 4), 'b' (2, 6)"),
        (lambda: spot.similarity_matrix({}), "no prompts"),
        (lambda: spot.prompt_similarity(np.ones((3, 4)), np.ones((3, 4)), "l2"), "measure must be one of"),
        (lambda: spot.prompt_similarity(np.zeros((3, 4)), np.ones((3, 4))), "zero vector"),
    ]:
        with pytest.raises(ValueError) as error:
            call()
        assert message in str(error.value) and "\n" not in str(error.value)


# --- evaluation and plots ----------------------------------------------------

def test_evaluate_ranking():
    ranking = [("a", 0.9), ("b", 0.5), ("c", 0.4), ("d", 0.1)]
    report = spot.evaluate_ranking(ranking, {"a": 1.0, "b": 0.0, "c": 3.0, "d": -2.0, "unused": 9.0}, k=2)
    assert report["spearman"] == pytest.approx(0.4)
    assert (report["top1"], report["best"], report["top1_is_best"], report["rank_of_best"]) == ("a", "c", False, 3)
    assert report["best_in_top_k"] is False and report["regret"] == pytest.approx(2.0)
    assert spot.evaluate_ranking(ranking, {"a": 1.0, "b": 0.0, "c": 3.0, "d": -2.0}, k=3)["best_in_top_k"]
    tied = spot.evaluate_ranking(ranking, dict(a=2.0, b=2.0, c=0.0, d=0.0))
    assert tied["top1_is_best"] and tied["regret"] == 0
    with pytest.raises(ValueError, match="no measured gain for"):
        spot.evaluate_ranking(ranking, {"a": 1.0})
    with pytest.raises(ValueError, match="k must be a positive int"):
        spot.evaluate_ranking(ranking, dict(a=1, b=1, c=1, d=1), k=0)


def test_transfer_gain_matrix_and_heatmaps():
    gains = spot.transfer_gain_matrix({("s1", "t1"): 0.8, ("s2", "t1"): 0.6, ("s1", "t2"): 0.9},
                                      {"t1": 0.7, "t2": 0.95}, ["t1", "t2"], ["s1", "s2"])
    np.testing.assert_allclose(gains[0], [0.1, -0.1])
    assert gains[1, 0] == pytest.approx(-0.05) and np.isnan(gains[1, 1])
    prompts = random_prompts(["t1", "t2", "s1", "s2"])
    similarity = spot.similarity_matrix(prompts)
    similarity[0, 1] = similarity[1, 0] = np.nan  # a pair not measured
    fig = plotting.plot_similarity_and_gains(similarity, list(prompts), gains, ["t1", "t2"], ["s1", "s2"])
    assert len(fig.axes) == 4
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["t1", "t2"]
    fig.savefig(io.BytesIO(), format="png")  # draws every artist


# --- released prompts ----------------------------------------------------------

@pytest.fixture(scope="module")
def released(fixtures_dir):
    folder = fixtures_dir / "pretrained_prompts" / "t5_1_1_lm100k_base"
    return {name: load_prompt(folder / f"{name}.npy") for name in RELEASED}


def test_released_prompts_similarity(released):
    avg, pairs = (spot.similarity_matrix(released, measure) for measure in spot.MEASURES)
    np.testing.assert_allclose(np.diag(avg), 1.0, atol=1e-9)
    # MRPC-RTE (both sentence-pair tasks) is the closest pair under both measures
    np.testing.assert_allclose([avg[0, 1], avg[0, 2], avg[1, 2]], [0.4956, 0.5184, 0.5646], atol=1e-3)
    np.testing.assert_allclose([pairs[0, 1], pairs[0, 2], pairs[1, 2]], [0.0170, 0.0171, 0.0220], atol=1e-3)
    assert spot.rank_sources("rte", ["sst2", "mrpc"], released)[0][0] == "mrpc"
    assert spot.rank_sources("mrpc", ["sst2", "rte"], released, "pairs")[0][0] == "rte"
