"""The trainer: prompt tuning finds a known prompt, freezes the rest bitwise, resumes exactly, stops on NaN."""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from prompt_tuning_nb import family, t5
from prompt_tuning_nb.training.evaluation import classification_evaluator, prepend_tokens
from prompt_tuning_nb.training.known_prompt import MarkerTask
from prompt_tuning_nb.training.loop import EarlyStopping, NonFiniteLossError, array_batches, train
from prompt_tuning_nb.formats.tree import flatten_params
from prompt_tuning_nb.training.optim import PROMPT_REGEX, model_tuning_rules, pretraining_rules, prompt_tuning_rules
from prompt_tuning_nb.training.step import LossConfig, init_train_state, make_train_step

PROMPT = "encoder/prompt/prompt/prompt"
TINY = t5.T5Config(vocab_size=32, d_model=16, num_heads=2, head_dim=8, num_encoder_layers=1, num_decoder_layers=1,
                   mlp_dim=32)


def tiny_task(n=64, seed=0):
    rng = np.random.default_rng(seed)
    inputs = np.concatenate([rng.integers(5, 32, (n, 5)), np.ones((n, 1), int)], axis=1)
    labels = (inputs[:, 0] < 18).astype(int)
    return inputs, labels, np.stack([3 + labels, np.ones(n, int)], axis=1)


def bytes_of(tree):
    return {p: np.asarray(v).tobytes() for p, v in flatten_params(tree).items()}


def run(model_dir, batches, config=TINY, steps=30, **overrides):
    inputs, labels, _ = tiny_task()
    params = t5.init_params(config, jax.random.key(0), prompt_length=2)
    kwargs = dict(model_dir=model_dir, train_steps=steps, seed=0, loss=LossConfig(), checkpoint_every=10,
                  evaluate=classification_evaluator(config, inputs, labels, np.array([[3, 1], [4, 1]]), batch_size=64),
                  eval_every=5, early_stopping=EarlyStopping("auc"), log_every=5, progress=False)
    return params, train(config, params, prompt_tuning_rules(), batches, **{**kwargs, **overrides})


def tiny_batches():
    inputs, _, targets = tiny_task()
    return array_batches({"encoder_input_tokens": inputs, "decoder_target_tokens": targets}, batch_size=16, seed=0)


@pytest.fixture(scope="module", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
    "Each `train` call jits its step anew: a persistent compilation cache makes the repeats cheap."
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = {name: getattr(jax.config, name) for name in names}
    compilation_cache.reset_cache()
    jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(names[1], 0.5)
    jax.config.update(names[2], 0)
    yield
    compilation_cache.reset_cache()
    for name, value in previous.items():
        jax.config.update(name, value)


DROPOUT = TINY.replace(dropout_rate=0.1)  # dropout keys must be reproduced too


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    "An uninterrupted prompt-tuning run with dropout: `(starting params, TrainResult)`."
    return run(tmp_path_factory.mktemp("whole"), tiny_batches(), config=DROPOUT)


def test_prompt_tuning_keeps_every_other_array_bitwise(whole_run):
    params, result = whole_run
    start, end, best = bytes_of(params), bytes_of(result.params), bytes_of(result.best_params)
    assert [p for p in start if start[p] != end[p]] == [PROMPT]
    assert all(start[p] == best[p] for p in start if p != PROMPT)
    frozen = flatten_params(params)
    assert all(flatten_params(result.params)[p] is frozen[p] for p in frozen if p != PROMPT)


class Interrupted(Exception):
    pass


def interrupted_at(batches, kill_step):
    def wrapped(start):
        for step, batch in enumerate(batches(start), start):
            if step == kill_step:
                raise Interrupted(f"killed at step {step}")
            yield batch
    return wrapped


def comparable(records):
    return [{k: v for k, v in r.items() if k != "examples_per_second"} for r in records]


def test_resume_after_interrupt_reproduces_the_prompt(whole_run, tmp_path):
    _, whole = whole_run
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", interrupted_at(tiny_batches(), 17), config=DROPOUT)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["10"]
    _, resumed = run(tmp_path / "resumed", tiny_batches(), config=DROPOUT)
    assert bytes_of(resumed.params)[PROMPT] == bytes_of(whole.params)[PROMPT]
    assert bytes_of(resumed.best_params)[PROMPT] == bytes_of(whole.best_params)[PROMPT]
    assert (resumed.best_step, resumed.best_metrics) == (whole.best_step, whole.best_metrics)
    logs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (whole.model_dir, resumed.model_dir)]
    assert comparable(logs[0]) == comparable(logs[1])
    exported = [d / "numpy_checkpoints" / "checkpoint_30" / "encoder.prompt.prompt.prompt"
                for d in (whole.model_dir, resumed.model_dir)]
    assert exported[0].read_bytes() == exported[1].read_bytes()


def test_patience_stops_the_run_and_a_rerun_returns_it(tmp_path):
    params = t5.init_params(TINY, jax.random.key(0), prompt_length=2)
    kwargs = dict(model_dir=tmp_path, train_steps=100, seed=0, loss=LossConfig(), checkpoint_every=50,
                  evaluate=lambda params: {"accuracy": 0.5}, eval_every=5,
                  early_stopping=EarlyStopping("accuracy", patience=2), progress=False)
    result = train(TINY, params, prompt_tuning_rules(), tiny_batches(), **kwargs)
    assert (result.stopped_early, result.step, result.best_step) == (True, 10, 0)
    assert bytes_of(result.best_params)[PROMPT] == bytes_of(params)[PROMPT]
    assert bytes_of(result.params)[PROMPT] != bytes_of(params)[PROMPT]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10"]
    again = train(TINY, params, prompt_tuning_rules(), tiny_batches(), **kwargs)
    assert (again.stopped_early, again.step, again.best_step) == (True, 10, 0)
    assert bytes_of(again.best_params)[PROMPT] == bytes_of(params)[PROMPT]


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path):
    poison = optax.chain(optax.sgd(0.1), optax.scale_by_schedule(lambda count: jnp.where(count >= 12, jnp.nan, 1.0)))
    rules = [(PROMPT_REGEX, poison), (".*", None)]
    inputs, _, targets = tiny_task()
    params = t5.init_params(TINY, jax.random.key(0), prompt_length=2)
    with pytest.raises(NonFiniteLossError) as error:
        train(TINY, params, rules, tiny_batches(), model_dir=tmp_path, train_steps=30, seed=0, loss=LossConfig(),
              checkpoint_every=5, log_every=10, progress=False)
    message = str(error.value)
    assert "\n" not in message
    assert "training loss is nan at step 14" in message and "last good checkpoint is step 10" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10"]
    saved = np.load(tmp_path / "numpy_checkpoints" / "checkpoint_10" / "encoder.prompt.prompt.prompt")
    assert np.isfinite(saved).all()


def test_decoder_only_pretraining_step_lowers_the_loss():
    config = TINY.replace(decoder_only=True)
    params = t5.init_params(config, jax.random.key(0))
    tokens = np.array([[0, 5, 6, 7, 8, 9, 1], [0, 9, 8, 7, 6, 5, 1]])
    batch = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
             "decoder_causal_attention": np.array([[1, 1, 1, 0, 0, 0]] * 2),
             "decoder_loss_weights": np.array([[0, 0, 1, 1, 1, 1]] * 2)}
    rules = pretraining_rules(1.0, warmup_steps=10)
    state, step = init_train_state(params, rules, seed=0), make_train_step(config, rules, LossConfig())
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        losses.append(float(metrics["cross_entropy"]))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_jit_and_eager_steps_agree():
    params = t5.init_params(TINY, jax.random.key(0), prompt_length=2)
    inputs, _, targets = tiny_task(8)
    batch = {"encoder_input_tokens": inputs, "decoder_target_tokens": targets}
    rules = prompt_tuning_rules()
    eager, m_eager = make_train_step(TINY, rules, LossConfig(), jit=False)(init_train_state(params, rules, 0), batch)
    jitted, m_jit = make_train_step(TINY, rules, LossConfig())(init_train_state(params, rules, 0), batch)
    np.testing.assert_allclose(m_eager["loss"], m_jit["loss"], rtol=1e-5)
    np.testing.assert_allclose(eager.params["encoder"]["prompt"]["prompt"]["prompt"],
                               jitted.params["encoder"]["prompt"]["prompt"]["prompt"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_prompt_tuning_finds_a_known_prompt(tmp_path):
    started = time.perf_counter()
    task = MarkerTask()
    config = t5.T5Config(vocab_size=task.vocab_size, d_model=32, num_heads=2, head_dim=16, num_encoder_layers=2,
                         num_decoder_layers=2, mlp_dim=64)
    val_marked, val_labels = task.sample(512, seed=100, marked=True)
    val_unmarked, _ = task.sample(512, seed=100, marked=False)

    def accuracy_on(inputs):
        return classification_evaluator(config, inputs, val_labels, task.candidates, batch_size=256)

    model = train(config, t5.init_params(config, jax.random.key(0)), model_tuning_rules(0.01),
                  array_batches(task.model_tuning_data(4096, seed=0), batch_size=32, seed=0),
                  model_dir=tmp_path / "model", train_steps=600, seed=0, loss=LossConfig(), checkpoint_every=600,
                  progress=False)
    marked = accuracy_on(val_marked)(model.params)["accuracy"]
    unmarked_metrics = accuracy_on(val_unmarked)(model.params)
    unmarked = unmarked_metrics["accuracy"]
    designed = accuracy_on(prepend_tokens(val_unmarked[:, :-task.num_markers], task.markers))(model.params)["accuracy"]

    train_inputs, train_labels = task.sample(4096, seed=1, marked=False)
    prompt = jax.random.uniform(jax.random.key(1), (task.num_markers, config.d_model), minval=-0.5, maxval=0.5)
    tuned = train(config, family.with_prompt(config, model.params, prompt), prompt_tuning_rules(),
                  array_batches({"encoder_input_tokens": train_inputs,
                                 "decoder_target_tokens": task.targets(train_labels)}, batch_size=32, seed=1),
                  model_dir=tmp_path / "prompt", train_steps=150, seed=0, loss=LossConfig(), checkpoint_every=50,
                  evaluate=accuracy_on(val_unmarked), eval_every=25, early_stopping=EarlyStopping("accuracy"),
                  progress=False)
    first_eval = json.loads((tmp_path / "prompt" / "metrics.jsonl").read_text().splitlines()[0])
    print(f"marked {marked:.3f} unmarked {unmarked:.3f} (AUC {unmarked_metrics['auc']:.3f}) designed {designed:.3f} random prompt "
          f"{first_eval['accuracy']:.3f} tuned {tuned.best_metrics['accuracy']:.3f} at step {tuned.best_step} "
          f"({time.perf_counter() - started:.0f} s)")
    assert marked > 0.95
    assert abs(unmarked - 0.5) < 0.1 and abs(unmarked_metrics["auc"] - 0.5) < 0.1
    assert abs(first_eval["accuracy"] - 0.5) < 0.1  # a random prompt does not help
    assert designed == marked
    assert tuned.best_metrics["accuracy"] > marked - 0.05
    before, after = bytes_of(model.params), bytes_of(tuned.best_params)
    assert set(after) - set(before) == {PROMPT}
    assert all(before[p] == after[p] for p in before)
