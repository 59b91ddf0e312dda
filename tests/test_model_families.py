"""The model-family interface: the T5 prefix LM's rank classification, decoding and training through the same
evaluators and train step as the encoder-decoder, checked against its forward pass; `load_model` on a random
preset, a zoo model, the original's T5X checkpoint and a Hugging Face folder written by transformers; and the
rule that no module outside the T5 family branches on `decoder_only`."""
import json
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

import prompt_tuning_nb
from prompt_tuning_nb import family, t5
from prompt_tuning_nb.data import default_vocabulary
from prompt_tuning_nb.experiment import SMOKE
from prompt_tuning_nb.formats.t5x import load_t5x_checkpoint
from prompt_tuning_nb.training.evaluation import classification_evaluator, decode, score_candidates
from prompt_tuning_nb.training.optim import prompt_tuning_rules
from prompt_tuning_nb.training.step import LossConfig, init_train_state, make_train_step
from prompt_tuning_nb.zoo import pretrained_model

REPO = Path(__file__).resolve().parents[1]
LM = t5.T5Config(vocab_size=64, d_model=32, num_heads=2, head_dim=16, num_encoder_layers=0, num_decoder_layers=2,
                 mlp_dim=64, decoder_only=True)
INPUTS = np.array([[5, 6, 7, 1], [8, 1, 0, 0], [9, 10, 1, 0]], np.int32)
CANDIDATES = np.array([[3, 1, 0], [4, 4, 1]], np.int32)


def full_sequence_logits(params, inputs_row, continuation):
    "Log-softmax `[T, V]` of the prefix LM on `[BOS, inputs..., continuation...]`, the inputs bidirectional."
    tokens = [0, *inputs_row, *continuation]
    causal = [1] * (len(inputs_row) + 1) + [0] * len(continuation)
    logits = t5.decoder_only_forward(LM, params, np.array([tokens]), np.array([causal]))
    return np.asarray(jax.nn.log_softmax(logits[0]))


@pytest.fixture(scope="module")
def lm_params():
    return t5.init_params(LM, jax.random.key(3))


def test_prefix_lm_rank_classification_scores_each_candidate_by_its_tokens(lm_params):
    scores = score_candidates(LM, lm_params, INPUTS, CANDIDATES, batch_size=2)
    for row, inputs in enumerate(INPUTS):
        real = [int(t) for t in inputs if t]
        for c, candidate in enumerate(CANDIDATES):
            tokens = [int(t) for t in candidate if t]
            log_p = full_sequence_logits(lm_params, real, tokens)
            expected = sum(log_p[len(real) + i, token] for i, token in enumerate(tokens))
            np.testing.assert_allclose(scores[row, c], expected, rtol=1e-5, atol=1e-5)
    metrics = classification_evaluator(LM, INPUTS, np.array([0, 1, 1]), CANDIDATES, batch_size=2)(lm_params)
    assert metrics["accuracy"] == np.mean(np.argmax(scores, axis=1) == np.array([0, 1, 1]))


def test_prefix_lm_greedy_decoding_is_the_argmax_of_the_full_forward_pass(lm_params):
    decoded = decode(LM, lm_params, INPUTS, max_decode_length=5, batch_size=2)
    for row, inputs in enumerate(INPUTS):
        real, generated = [int(t) for t in inputs if t], []
        for _ in range(5):  # one full forward pass per token: no cache, so an independent reference
            next_token = int(np.argmax(full_sequence_logits(lm_params, real, generated)[len(real) + len(generated)]))
            generated.append(next_token)
            if next_token == 1:
                break
        assert decoded[row].tolist() == generated + [0] * (5 - len(generated))


def test_prefix_lm_prompt_tuning_trains_the_decoder_prompt_on_task_features(lm_params):
    prompted = family.with_prompt(LM, lm_params, np.zeros((3, 32), np.float32))
    rules = prompt_tuning_rules(0.3)
    step, state = make_train_step(LM, rules, LossConfig()), init_train_state(prompted, rules, seed=0)
    batch = {"encoder_input_tokens": INPUTS, "decoder_target_tokens": CANDIDATES[[0, 1, 1]]}
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1
    assert family.prompt_variable_name(LM) == "decoder.prompt.prompt.prompt"
    assert not np.array_equal(family.prompt_of(LM, state.params), np.zeros((3, 32)))


def test_load_model_on_a_random_preset():
    model = prompt_tuning_nb.load_model("small", seed=1)
    assert model.family.name == "t5_1_1" and model.config == t5.T5Config.from_preset("small")
    reference = t5.init_params(t5.T5Config.from_preset("small"), jax.random.key(1))
    np.testing.assert_array_equal(family.embedding_of(model.config, model.params)[:5],
                                  reference["token_embedder"]["embedding"][:5])


def test_load_model_on_a_zoo_model():
    recipe = SMOKE["zoo_recipe"]
    model = prompt_tuning_nb.load_model("mini_xs", zoo_recipe=recipe, progress=False)
    config, params, _ = pretrained_model("mini_xs", recipe, progress=False)
    assert model.config == config and model.vocabulary == default_vocabulary()  # 8,100 pieces in 8,192 rows
    tokens, targets = np.array([[45, 67, 1]]), np.array([[12, 1]])
    np.testing.assert_allclose(model.logits(tokens, targets_BxT=targets),
                               t5.forward(config, params, tokens, t5.shift_right(targets)), rtol=1e-6)


def test_load_model_on_the_t5x_fixture(fixtures_dir):
    path = fixtures_dir / "t5x_tiny_checkpoint" / "checkpoint_3"
    model = prompt_tuning_nb.load_model(path, vocabulary=str(fixtures_dir / "t5_spiece.model"))
    config, params = load_t5x_checkpoint(path)
    assert model.config == config and model.source == str(path)
    tokens, targets = np.array([[37, 423, 1]]), np.array([[5, 1]])
    prompt = np.random.default_rng(0).normal(size=(3, config.d_model)).astype(np.float32)
    np.testing.assert_allclose(model.logits(tokens, prompt, targets_BxT=targets),
                               t5.forward(config, params, tokens, t5.shift_right(targets), prompt), rtol=1e-6)
    assert model.vocabulary.vocab_size == 32100 and model.vocabulary.decode(model.vocabulary.encode("a test")) == "a test"


def test_load_model_on_a_hugging_face_folder_written_by_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.T5Config(vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    reference = transformers.T5ForConditionalGeneration(hf_config).eval()
    reference.save_pretrained(tmp_path)
    model = prompt_tuning_nb.load_model(tmp_path)
    tokens, targets = np.array([[5, 9, 17, 1]]), np.array([[3, 4, 1]])
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(tokens), decoder_input_ids=torch.tensor(
            np.asarray(t5.shift_right(targets)))).logits.numpy()
    np.testing.assert_allclose(model.logits(tokens, targets_BxT=targets), expected, rtol=1e-4, atol=1e-5)


def test_only_the_t5_family_modules_branch_on_decoder_only():
    found = subprocess.run(["grep", "-rln", "decoder_only", "prompt_tuning_nb", "--include=*.py"], cwd=REPO,
                           capture_output=True, text=True).stdout.split()
    assert sorted(found) == ["prompt_tuning_nb/_modidx.py", "prompt_tuning_nb/t5.py", "prompt_tuning_nb/t5_layers.py",
                             "prompt_tuning_nb/t5_shapes.py"]


def test_load_model_on_the_packaged_smollm2_and_its_peft_adapter(tmp_path):
    from prompt_tuning_nb import llama
    from prompt_tuning_nb.formats.prompt_files import load_peft_prompt, save_peft_prompt
    model = prompt_tuning_nb.load_model("smollm2_135m")
    assert model.family.name == "llama" and family.prompt_variable_name(model.config) == "decoder.prompt.prompt.prompt"
    ids = model.vocabulary.encode("The capital of France is")
    assert ids == model.vocabulary.encode("The capital of France is") and len(ids) == 5
    logits = model.logits(np.array([ids]))
    assert logits.shape == (1, 5, 49152)
    np.testing.assert_allclose(logits, llama.forward(model.config, model.params, np.array([ids])), rtol=1e-6)
    prompt = np.random.default_rng(0).normal(size=(4, 576)).astype(np.float32)
    adapter = save_peft_prompt(tmp_path / "adapter", prompt, config=model.config)
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert (written["task_type"], written["num_layers"], written["token_dim"]) == ("CAUSAL_LM", 30, 576)
    np.testing.assert_array_equal(load_peft_prompt(adapter), prompt)


@pytest.mark.parametrize("name", ["t5_prefix_lm", "llama"])
def test_per_example_prompts_score_and_decode_as_each_prompt_alone(name, lm_params):
    """A `[B, P, D]` prompt gives each row its own prompt: rank classification (the prefix LM repeats rows per
    candidate; Llama continues a cache over two-token candidates) and beam search (rows repeated per beam) equal
    what each prompt gives alone in the parameters."""
    from prompt_tuning_nb import llama

    if name == "llama":
        config = llama.LlamaConfig.from_preset("tiny", bos_id=None, eos_id=1, pad_id=0)
        params = llama.init_params(config, jax.random.key(4))
    else:
        config, params = LM, lm_params
    prompts_KxPxD = np.asarray(jax.random.normal(jax.random.key(5), (2, 3, family.embedding_of(config, params).shape[1])))
    ids_N = np.array([1, 0, 1])
    mixed = score_candidates(config, params, INPUTS, CANDIDATES, batch_size=2, prompts_KxPxD=prompts_KxPxD,
                             prompt_ids_N=ids_N)
    fam = family.family_of(config)
    own = family.with_prompt(config, params, prompts_KxPxD[ids_N])
    beams = np.asarray(fam.generate(own, INPUTS, 4, method="beam", beam_size=2))
    for row, k in enumerate(ids_N):
        alone = family.with_prompt(config, params, prompts_KxPxD[k])
        np.testing.assert_allclose(mixed[row], score_candidates(config, alone, INPUTS[row:row + 1], CANDIDATES,
                                                                batch_size=1)[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(beams[row], fam.generate(alone, INPUTS[row:row + 1], 4, method="beam",
                                                               beam_size=2)[0])
    assert not np.allclose(mixed[0], score_candidates(config, family.with_prompt(config, params, prompts_KxPxD[0]),
                                                      INPUTS[:1], CANDIDATES, batch_size=1)[0])  # the prompts differ
