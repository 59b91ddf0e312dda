"""Prompt tuning freezes the model: the project's rules and train step change the prompt and nothing else."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_tuning_nb import family, t5
from prompt_tuning_nb.training.optim import prompt_tuning_rules
from prompt_tuning_nb.training.step import LossConfig, init_train_state, make_train_step

PROMPT_PATH = "encoder/prompt/prompt/prompt"
ENCODER = np.array([[5, 6, 7, 1], [8, 1, 0, 0]], np.int32)
TARGETS = np.array([[3, 1], [4, 1]], np.int32)


@pytest.fixture(scope="module")
def mini_xs():
    "`(config, params)` of a freshly initialized mini_xs model with a 4-token prompt."
    config = t5.T5Config.from_preset("mini_xs")
    return config, t5.init_params(config, jax.random.key(0), prompt_length=4)


def host_arrays(params: dict) -> dict:
    "`{path: numpy copy}` of every leaf, so later steps (which donate their inputs) cannot change what was seen."
    return {"/".join(k.key for k in path): np.array(leaf, copy=True)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def changed_paths(before: dict, after: dict) -> list:
    "The paths whose array differs in shape, dtype or any bit."
    assert before.keys() == after.keys()
    return [path for path in before if (before[path].dtype, before[path].shape, before[path].tobytes())
            != (after[path].dtype, after[path].shape, after[path].tobytes())]


def test_prompt_tuning_steps_change_exactly_the_prompt_and_lower_the_loss(mini_xs):
    config, params = mini_xs
    rules = prompt_tuning_rules()
    train_step, state = make_train_step(config, rules, LossConfig()), init_train_state(params, rules, seed=0)
    batch = {"encoder_input_tokens": ENCODER, "decoder_target_tokens": TARGETS}
    seen, losses = [host_arrays(params)], []
    for _ in range(3):
        state, metrics = train_step(state, batch)
        seen.append(host_arrays(state.params))
        losses.append(float(metrics["loss"]))  # the loss of the parameters this step started from

    assert int(state.step) == 3
    for before, after in zip(seen, seen[1:]):
        assert changed_paths(before, after) == [PROMPT_PATH]
        assert np.isfinite(after[PROMPT_PATH]).all()
    assert losses[0] > losses[1] > losses[2], losses  # each of the first two steps lowered it


def test_gradient_with_respect_to_the_prompt_argument(mini_xs):
    config, params = mini_xs  # the argument replaces the prompt the tree holds
    prompt = jax.random.uniform(jax.random.key(1), (4, config.d_model), minval=-0.5, maxval=0.5)

    def argument_loss(prompt_PxD):
        logits = t5.forward(config, params, ENCODER, t5.shift_right(TARGETS), prompt=prompt_PxD)
        return optax.softmax_cross_entropy_with_integer_labels(logits, TARGETS).mean()

    def tree_loss(prompt_PxD):
        logits = t5.forward(config, family.with_prompt(config, params, prompt_PxD), ENCODER, t5.shift_right(TARGETS))
        return optax.softmax_cross_entropy_with_integer_labels(logits, TARGETS).mean()

    loss_and_grad = jax.jit(jax.value_and_grad(argument_loss))
    loss, grad = loss_and_grad(prompt)
    assert grad.shape == prompt.shape and float(jnp.abs(grad).sum()) > 0
    np.testing.assert_allclose(grad, jax.jit(jax.grad(tree_loss))(prompt), rtol=1e-5, atol=1e-7)
    assert float(loss_and_grad(prompt - 0.1 * grad)[0]) < float(loss)
