"""Our T5 1.1 computes what Hugging Face's T5 (and PEFT's prompt tuning of it) computes.

A random `transformers` T5 v1.1 model is saved with `save_pretrained`, loaded with `load_hf_t5`, and both
implementations run on the same padded batches.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from prompt_tuning_nb import t5
from prompt_tuning_nb.formats.hf import load_hf_t5

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HF_CONFIG = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
PROMPT_LENGTH = 5


def relative_error(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return np.abs(ours - reference).max() / np.abs(reference).max()


def build_reference_model():
    """A random T5 v1.1 with an untied output layer and non-trivial norm scales."""
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**HF_CONFIG)).eval()
    # transformers 5 ties T5's lm_head to the input embedding whatever the config says: untie by hand.
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.2)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "layer_norm" in name:
                weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = build_reference_model()
    folder = tmp_path_factory.mktemp("hf_t5")
    model.save_pretrained(folder)
    config, params = load_hf_t5(folder)
    return model, config, params


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    encoder = rng.integers(2, HF_CONFIG["vocab_size"], size=(3, 9))
    for row, length in enumerate([9, 6, 3]):
        encoder[row, length - 1] = 1
        encoder[row, length:] = 0
    targets = rng.integers(2, HF_CONFIG["vocab_size"], size=(3, 5))
    for row, length in enumerate([5, 3, 2]):
        targets[row, length - 1] = 1
        targets[row, length:] = 0
    return encoder, targets


def torch_long(x):
    return torch.from_numpy(np.array(x, dtype=np.int64))


def our_loss(logits, targets):
    weights = targets != 0
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return float(jnp.sum(losses * weights) / jnp.sum(weights))


def test_config_is_read_from_the_folder(reference):
    _, config, _ = reference
    assert (config.d_model, config.num_heads, config.head_dim, config.mlp_dim) == (32, 4, 8, 48)
    assert (config.num_encoder_layers, config.num_decoder_layers, config.vocab_size) == (2, 3, 384)
    assert (config.relpos_buckets, config.relpos_max_distance) == (8, 20)


def test_logits_and_loss_match_transformers(reference, batch):
    model, config, params = reference
    encoder, targets = batch
    labels = np.where(targets == 0, -100, targets)
    with torch.no_grad():
        out = model(input_ids=torch_long(encoder), attention_mask=torch_long(encoder != 0), labels=torch_long(labels))
    decoder_inputs = t5.shift_right(jnp.asarray(targets))
    logits = jax.jit(t5.forward, static_argnums=0)(config, params, jnp.asarray(encoder), decoder_inputs)
    valid = targets != 0
    assert relative_error(np.asarray(logits)[valid], out.logits.numpy()[valid]) <= 1e-5
    assert relative_error(our_loss(logits, targets), out.loss.item()) <= 1e-5


def test_prompted_forward_matches_peft(reference, batch):
    model, config, params = reference
    encoder, targets = batch
    prompt = np.random.default_rng(1).normal(size=(PROMPT_LENGTH, config.d_model)).astype(np.float32)
    peft_config = peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=PROMPT_LENGTH)
    prompted = peft.get_peft_model(build_reference_model(), peft_config).eval()
    with torch.no_grad():
        embedding = prompted.prompt_encoder["default"].embedding.weight
        embedding[:PROMPT_LENGTH] = torch.from_numpy(prompt.copy())
        out = prompted(input_ids=torch_long(encoder), attention_mask=torch_long(encoder != 0),
                       decoder_input_ids=torch_long(np.asarray(t5.shift_right(jnp.asarray(targets)))))
    logits = t5.forward(config, params, jnp.asarray(encoder), t5.shift_right(jnp.asarray(targets)),
                        prompt=jnp.asarray(prompt))
    valid = targets != 0
    assert relative_error(np.asarray(logits)[valid], out.logits.numpy()[valid]) <= 1e-5


def test_greedy_decoding_matches_generate(reference, batch):
    model, config, params = reference
    encoder, _ = batch
    length = 7
    with torch.no_grad():  # transformers' cache assumes as many decoder as encoder layers: decode without it
        generated = model.generate(input_ids=torch_long(encoder), attention_mask=torch_long(encoder != 0),
                                   max_new_tokens=length, do_sample=False, num_beams=1, use_cache=False)
    generated = generated.numpy()[:, 1:]
    expected = np.zeros((len(encoder), length), np.int64)
    expected[:, :generated.shape[1]] = generated
    ours = jax.jit(t5.greedy_decode, static_argnums=(0, 3))(config, params, jnp.asarray(encoder), length)
    np.testing.assert_array_equal(np.asarray(ours), expected)


def test_bfloat16_activations_stay_close(reference, batch):
    _, config, params = reference
    encoder, targets = batch
    decoder_inputs = t5.shift_right(jnp.asarray(targets))
    exact = t5.forward(config, params, jnp.asarray(encoder), decoder_inputs)
    low = t5.forward(config.replace(dtype="bfloat16"), params, jnp.asarray(encoder), decoder_inputs)
    assert low.dtype == jnp.float32
    assert relative_error(low, exact) < 0.05
