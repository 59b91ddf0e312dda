"""Prompt tuning freezes the model: a gradient step on the prompt changes the prompt and nothing else."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prompt_tuning_nb import t5

PROMPT_PATH = "encoder/prompt/prompt/prompt"


def path_of(key_path):
    return "/".join(k.key for k in key_path)


def loss_fn(config, params, encoder, targets):
    logits = t5.forward(config, params, encoder, t5.shift_right(targets))
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def test_a_prompt_step_changes_exactly_the_prompt():
    config = t5.T5Config.from_preset("mini_xs")
    params = t5.init_params(config, jax.random.key(0), prompt_length=4)
    encoder = jnp.array([[5, 6, 7, 1], [8, 1, 0, 0]])
    targets = jnp.array([[3, 1], [4, 1]])
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "prompt" if path_of(path) == PROMPT_PATH else "frozen", params)
    optimizer = optax.multi_transform(
        {"prompt": optax.adafactor(0.3, decay_rate=0.8, weight_decay_rate=1e-5, multiply_by_parameter_scale=False),
         "frozen": optax.set_to_zero()}, labels)
    grads = jax.grad(lambda p: loss_fn(config, p, encoder, targets))(params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    stepped = optax.apply_updates(params, updates)

    before = dict((path_of(p), np.asarray(v)) for p, v in jax.tree_util.tree_flatten_with_path(params)[0])
    after = dict((path_of(p), np.asarray(v)) for p, v in jax.tree_util.tree_flatten_with_path(stepped)[0])
    changed = [path for path in before if before[path].tobytes() != after[path].tobytes()]
    assert changed == [PROMPT_PATH]


def test_gradient_with_respect_to_the_prompt_argument():
    config = t5.T5Config.from_preset("mini_xs")
    params = t5.init_params(config, jax.random.key(0))
    prompt = jax.random.uniform(jax.random.key(1), (4, config.d_model), minval=-0.5, maxval=0.5)
    encoder = jnp.array([[5, 6, 7, 1], [8, 1, 0, 0]])
    targets = jnp.array([[3, 1], [4, 1]])

    def prompt_loss(prompt_PxD):
        logits = t5.forward(config, params, encoder, t5.shift_right(targets), prompt=prompt_PxD)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss, grad = jax.jit(jax.value_and_grad(prompt_loss))(prompt)
    assert grad.shape == prompt.shape and float(jnp.abs(grad).sum()) > 0
    assert float(prompt_loss(prompt - 0.1 * grad)) < float(loss)
