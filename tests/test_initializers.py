"""Prompt initializers on the real T5 SentencePiece vocabulary and the reference embedding table."""
import shutil

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prompt_tuning_nb
from prompt_tuning_nb import initializers as I
from prompt_tuning_nb.formats.t5x import load_t5x_checkpoint

CONFIGS = prompt_tuning_nb.__path__[0] + "/configs/prompts"
RNG = jax.random.key(0)


@pytest.fixture(scope="module")
def table(fixtures_dir):
    """The reference embedding table [32128, 4]."""
    return np.load(fixtures_dir / "tiny_embeddings_32128x4.npy")


@pytest.fixture(scope="module")
def vocab(fixtures_dir):
    """The T5 SentencePiece vocabulary, through seqio."""
    seqio = pytest.importorskip("seqio")
    return seqio.SentencePieceVocabulary(str(fixtures_dir / "t5_spiece.model"))


def row_ids(table, prompt):
    """The index of each prompt row in `table` (each must match exactly one row)."""
    index = {}
    for i, row in enumerate(table):
        index.setdefault(row.tobytes(), []).append(i)
    matches = [index.get(row.tobytes(), []) for row in np.asarray(prompt, table.dtype)]
    assert all(len(m) == 1 for m in matches), f"prompt rows match {[len(m) for m in matches]} table rows"
    return [m[0] for m in matches]


# --- uniform -----------------------------------------------------------------

def test_uniform_is_symmetric_by_default():
    prompt = np.asarray(I.uniform()(RNG, (200, 16)))
    assert prompt.shape == (200, 16) and prompt.dtype == np.float32
    assert prompt.min() >= -0.5 and prompt.max() <= 0.5
    assert prompt.min() < -0.45 and prompt.max() > 0.45


def test_uniform_original_draw_is_zero_to_scale():
    prompt = np.asarray(I.uniform(scale=0.5, symmetric=False)(RNG, (200, 16)))
    assert prompt.min() >= 0 and prompt.max() < 0.5 and prompt.max() > 0.45


@pytest.mark.parametrize("scale", [0, -0.5])
def test_uniform_rejects_non_positive_scale(scale):
    with pytest.raises(ValueError, match=r"^uniform: scale must be > 0, got"):
        I.uniform(scale)


# --- sampled vocabulary ------------------------------------------------------

def test_sampled_rows_come_from_the_population_and_are_distinct(table):
    prompt = I.from_sample_of_embeddings(table, population_size=5000)(RNG, (100, 4))
    ids = row_ids(table, prompt)
    assert all(i < 5000 for i in ids)
    assert len(set(ids)) == 100


def test_sampled_whole_table_by_default(table):
    ids = row_ids(table, I.from_sample_of_embeddings(table)(RNG, (200, 4)))
    assert len(set(ids)) == 200 and max(ids) >= 5000  # 200 draws from 32128: almost surely some above 5000


def test_sampled_with_replacement_only_when_longer_than_population(table):
    ids = row_ids(table, I.from_sample_of_embeddings(table, population_size=3)(RNG, (10, 4)))
    assert set(ids) <= {0, 1, 2} and len(ids) == 10
    assert sorted(row_ids(table, I.from_sample_of_embeddings(table, 3)(RNG, (3, 4)))) == [0, 1, 2]


def test_population_larger_than_table_is_clamped_with_a_warning(table):
    with pytest.warns(UserWarning, match="population_size 50000 exceeds the embedding table's 32128 rows"):
        init = I.from_sample_of_embeddings(table, population_size=50000)
    assert init(RNG, (5, 4)).shape == (5, 4)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_population_size_must_be_positive(table, size):
    with pytest.raises(ValueError, match=r"^from_sample_of_embeddings: population_size must be a positive int or None"):
        I.from_sample_of_embeddings(table, population_size=size)


# --- class labels ------------------------------------------------------------

def test_class_label_rows_are_mean_piece_embeddings(table, vocab):
    labels = ["positive", "negative", "entailment", "not_entailment"]
    assert len(vocab.encode("entailment")) == 4  # sub-tokens are averaged
    prompt = np.asarray(I.from_embedded_list(table, vocab, labels)(RNG, (10, 4)))
    for row, label in zip(prompt, labels):
        np.testing.assert_allclose(row, table[vocab.encode(label)].mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(prompt[0], table[1465])  # "positive" is one piece
    rest = row_ids(table, prompt[4:])
    assert all(i < 5000 for i in rest) and len(set(rest)) == 6  # the paper's fill: sampled from the top 5,000


def test_class_labels_use_the_given_fallback(table, vocab):
    prompt = I.from_embedded_list(table, vocab, ["yes", "no"], initializer=I.uniform())(RNG, (5, 4))
    np.testing.assert_array_equal(prompt[2:], I.uniform()(RNG, (3, 4)))


def test_extra_class_labels_are_dropped_with_a_warning_naming_them(table, vocab):
    init = I.from_embedded_list(table, vocab, ["positive", "negative", "neutral"])
    with pytest.warns(UserWarning, match=r"dropping the labels \['neutral'\]"):
        prompt = init(RNG, (2, 4))
    np.testing.assert_array_equal(prompt, table[[1465, 2841]])


@pytest.mark.parametrize("label", ["", " ", "\n"])
def test_label_without_tokens_is_an_error(table, vocab, label):
    with pytest.raises(ValueError, match=r"^from_embedded_list: .* encodes to no tokens; expected at least one$"):
        I.from_embedded_list(table, vocab, ["positive", label])


def test_class_labels_argument_errors(table, vocab):
    with pytest.raises(ValueError, match="texts must be a list of class labels, got the single string 'positive'"):
        I.from_embedded_list(table, vocab, "positive")
    with pytest.raises(ValueError, match="texts is empty"):
        I.from_embedded_list(table, vocab, [])
    with pytest.raises(ValueError, match=r"'positive' has token id 1465, outside the embedding table's 100 rows"):
        I.from_embedded_list(table[:100], vocab, ["positive"])


# --- string ------------------------------------------------------------------

def test_string_rows_are_piece_embeddings_in_order(table, vocab):
    text = "Classify this review:"
    ids = vocab.encode(text)
    prompt = np.asarray(I.from_embedded_string(table, vocab, text)(RNG, (8, 4)))
    np.testing.assert_array_equal(prompt[: len(ids)], table[ids])
    assert all(i < 5000 for i in row_ids(table, prompt[len(ids):]))


def test_long_string_is_truncated_with_a_warning(table, vocab):
    text = "Classify this review:"
    init = I.from_embedded_string(table, vocab, text)
    with pytest.warns(UserWarning, match=r"encodes to 5 tokens, more than the prompt length 3; dropping the last 2"):
        prompt = init(RNG, (3, 4))
    np.testing.assert_array_equal(prompt, table[vocab.encode(text)[:3]])


def test_string_without_tokens_is_an_error(table, vocab):
    with pytest.raises(ValueError, match=r"^from_embedded_string: ' ' encodes to no tokens; expected at least one$"):
        I.from_embedded_string(table, vocab, " ")


# --- shared checks -----------------------------------------------------------

def vocabulary_inits(table, vocab):
    return {
        "from_sample_of_embeddings": I.from_sample_of_embeddings(table, 5000),
        "from_embedded_list": I.from_embedded_list(table, vocab, ["positive", "negative"]),
        "from_embedded_string": I.from_embedded_string(table, vocab, "Is it positive?"),
    }


def test_width_must_match_the_embedding_table(table, vocab):
    for name, init in vocabulary_inits(table, vocab).items():
        with pytest.raises(ValueError, match=rf"^{name}: prompt width 8 differs from the embedding table's width 4"):
            init(RNG, (6, 8))


def test_prompt_shape_must_be_two_dimensional(table, vocab):
    inits = {"uniform": I.uniform(), **vocabulary_inits(table, vocab)}
    for name, init in inits.items():
        with pytest.raises(ValueError, match=rf"^{name}: prompt shape must be \(P, H\)"):
            init(RNG, (2, 6, 4))


def test_same_seed_same_prompt_different_seeds_different_prompts(table, vocab):
    inits = {"uniform": I.uniform(), "original uniform": I.uniform(symmetric=False), **vocabulary_inits(table, vocab)}
    for name, init in inits.items():
        first, again = init(jax.random.key(7), (20, 4)), init(jax.random.key(7), (20, 4))
        other = init(jax.random.key(8), (20, 4))
        np.testing.assert_array_equal(first, again, err_msg=name)
        assert not np.array_equal(first, other), name


def test_dtype_is_honoured(table, vocab):
    for name, init in {"uniform": I.uniform(), **vocabulary_inits(table, vocab)}.items():
        assert init(RNG, (6, 4), jnp.bfloat16).dtype == jnp.bfloat16, name


def test_initializers_work_under_jit_and_in_the_prompt_modules(table, vocab):
    prompts = pytest.importorskip("prompt_tuning_nb.prompts")
    for name, init in vocabulary_inits(table, vocab).items():
        np.testing.assert_array_equal(jax.jit(init, static_argnums=1)(RNG, (6, 4)), init(RNG, (6, 4)), err_msg=name)
    init = I.from_embedded_list(table, vocab, ["positive", "negative"])  # labels + sampled fill
    params = prompts.Prompt(length=6, width=4, initializer=init).init(RNG)["params"]
    np.testing.assert_array_equal(params["prompt"][:2], table[[1465, 2841]])
    multi = prompts.MultiTaskPrompt(num_tasks=3, length=6, width=4, initializer=init).init(RNG)["params"]
    assert multi["prompt"].shape == (3, 6, 4)
    np.testing.assert_array_equal(multi["prompt"][:, :2], np.broadcast_to(table[[1465, 2841]], (3, 2, 4)))


# --- arrays and files --------------------------------------------------------

def test_from_array_returns_the_array_and_checks_its_shape():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    init = I.from_array(array)
    np.testing.assert_array_equal(init(RNG, (3, 4)), array)
    with pytest.raises(ValueError, match=r"^from_array: the array has shape \(3, 4\), expected the prompt shape \(4, 4\)$"):
        init(RNG, (4, 4))


def test_from_file_returns_the_prompt_unchanged(fixtures_dir, tmp_path):
    expected = np.load(fixtures_dir / "prompt_5x256.npy")
    np.testing.assert_array_equal(I.from_file(fixtures_dir / "prompt_5x256.npy")(RNG, (5, 256)), expected.astype(np.float32))
    # the T5X export: .npy format, no suffix
    t5x_file = tmp_path / "encoder.prompt.prompt.prompt"
    shutil.copy(fixtures_dir / "prompt_5x256.npy", t5x_file)
    np.testing.assert_array_equal(I.from_file(t5x_file)(RNG, (5, 256)), expected.astype(np.float32))


def test_from_file_of_the_wrong_shape_names_the_file(fixtures_dir):
    init = I.from_file(fixtures_dir / "prompt_5x256.npy")
    with pytest.raises(ValueError, match=r"^from_file: prompt file '.*prompt_5x256.npy' has shape \(5, 256\), "
                                         r"expected the prompt shape \(100, 256\)$"):
        init(RNG, (100, 256))


# --- gin ---------------------------------------------------------------------

@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def vocabulary_bindings(fixtures_dir):
    """How a `models/*.gin` file sets VOCABULARY, as in T5X."""
    return ["from __gin__ import dynamic_registration",
            "import seqio",
            f"seqio.SentencePieceVocabulary.sentencepiece_model_file = '{fixtures_dir / 't5_spiece.model'}'",
            "VOCABULARY = @seqio.SentencePieceVocabulary()"]


def configured_init(gin_file, bindings):
    """Parse `gin_file` + `bindings` (finalized, as the trainer does) and return the initializer PROMPT_INIT names."""
    gin.parse_config_files_and_bindings([f"{CONFIGS}/{gin_file}"], bindings)
    return gin.query_parameter("%PROMPT_INIT").scoped_configurable_fn()


def test_gin_class_labels_numpy(fixtures_dir, table, vocab, clean_gin, monkeypatch):
    loads = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    init = configured_init("from_class_labels_numpy.gin", vocabulary_bindings(fixtures_dir) + [
        f"EMBEDDING_FILE = '{fixtures_dir / 'tiny_embeddings_32128x4.npy'}'",
        "CLASS_LABELS = ['positive', 'negative']"])
    prompt = np.asarray(init(RNG, (6, 4)))
    assert len(loads) == 1  # one read for the labels and the sampled fill
    np.testing.assert_array_equal(prompt[:2], table[[1465, 2841]])
    assert all(i < 5000 for i in row_ids(table, prompt[2:]))


def test_gin_sampled_vocab_numpy(fixtures_dir, table, clean_gin):
    init = configured_init("from_sampled_vocab_numpy.gin",
                           [f"EMBEDDING_FILE = '{fixtures_dir / 'tiny_embeddings_32128x4.npy'}'"])
    ids = row_ids(table, init(RNG, (50, 4)))
    assert all(i < 5000 for i in ids) and len(set(ids)) == 50


def test_gin_string_numpy(fixtures_dir, table, vocab, clean_gin):
    init = configured_init("from_string_numpy.gin", vocabulary_bindings(fixtures_dir) + [
        f"EMBEDDING_FILE = '{fixtures_dir / 'tiny_embeddings_32128x4.npy'}'",
        "PROMPT_STRING = 'Is it positive?'"])
    ids = vocab.encode("Is it positive?")
    np.testing.assert_array_equal(init(RNG, (8, 4))[: len(ids)], table[ids])


def test_gin_from_file(fixtures_dir, clean_gin):
    init = configured_init("from_file.gin", [f"PROMPT_FILE = '{fixtures_dir / 'prompt_5x256.npy'}'"])
    np.testing.assert_array_equal(init(RNG, (5, 256)), np.load(fixtures_dir / "prompt_5x256.npy").astype(np.float32))


@pytest.mark.parametrize("gin_file, bindings, head", [
    ("from_sampled_vocab.gin", [], []),
    ("from_class_labels.gin", ["CLASS_LABELS = ['positive', 'negative']"], [1465, 2841]),
    ("from_string.gin", ["PROMPT_STRING = 'positive negative'"], [1465, 2841]),
])
def test_gin_reads_the_initial_checkpoint_embedding(fixtures_dir, vocab, clean_gin, gin_file, bindings, head):
    path = fixtures_dir / "t5x_tiny_checkpoint" / "checkpoint_3"
    embedding = np.asarray(load_t5x_checkpoint(path)[1]["token_embedder"]["embedding"])
    init = configured_init(gin_file, vocabulary_bindings(fixtures_dir) + [f"INITIAL_CHECKPOINT_PATH = '{path}'"] + bindings)
    prompt = np.asarray(init(RNG, (6, 4)))
    np.testing.assert_array_equal(prompt[: len(head)], embedding[head])
    assert all(i < 5000 for i in row_ids(embedding, prompt[len(head):]))  # the rest sampled from the top 5,000


def test_gin_requires_its_macros(clean_gin):
    with pytest.raises(ValueError, match="PROMPT_FILE/macro.value set to `%gin.REQUIRED` but not subsequently overridden"):
        configured_init("from_file.gin", [])
    gin.clear_config()
    with pytest.raises(ValueError, match="CLASS_LABELS"):
        configured_init("from_class_labels.gin", ["INITIAL_CHECKPOINT_PATH = 'unused'"])


def test_t5x_load_reads_one_variable(fixtures_dir):
    path = fixtures_dir / "t5x_tiny_checkpoint" / "checkpoint_3"
    assert I.t5x_load(path).shape == (32128, 4)
    assert I.t5x_load(path, "encoder/encoder_norm/scale").shape == (4,)
    with pytest.raises(ValueError, match=r"no variable `target/encoder/nope`"):
        I.t5x_load(path, "encoder/nope")
