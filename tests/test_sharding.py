"""Sharding: the same train steps on 1 and on 8 simulated devices, partition rules for every preset, memory plans from shapes."""
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from prompt_tuning_nb import family, t5
from prompt_tuning_nb.sharding import make_mesh, memory_plan, param_specs, print_memory_plan
from prompt_tuning_nb.training.loop import array_batches, train
from prompt_tuning_nb.training.optim import model_tuning_rules, prompt_tuning_rules
from prompt_tuning_nb.training.step import LossConfig, init_train_state, make_train_step

# Heads, MLP units and vocabulary all divide by 4 and 8, so the 2x4 and 8x1 meshes really split them.
CONFIG = t5.T5Config(vocab_size=64, d_model=32, num_heads=4, head_dim=8, num_encoder_layers=1, num_decoder_layers=1,
                     mlp_dim=64, dropout_rate=0.1)
MESHES = ((2, 4), (8, 1))
STEPS = 3
WI_0 = ("encoder", "layers_0", "mlp", "wi_0", "kernel")


def task_arrays(n=32, seed=0):
    rng = np.random.default_rng(seed)
    inputs = np.concatenate([rng.integers(5, 64, (n, 7)), np.ones((n, 1), int)], axis=1)
    targets = np.stack([3 + (inputs[:, 0] < 34), np.ones(n, int)], axis=1)
    return {"encoder_input_tokens": inputs, "decoder_target_tokens": targets}


@functools.cache
def initial_params():
    "The starting parameters (with a 4-token prompt) of every run here; `init_train_state` copies what trains."
    return t5.init_params(CONFIG, jax.random.key(0), prompt_length=4)


def rules_of(method):
    return prompt_tuning_rules() if method == "prompt" else model_tuning_rules()


def step_losses(method, mesh_shape=None):
    "Losses of `STEPS` train steps, and the per-device shape of one MLP kernel, on a `(data, model)` mesh or one device."
    params = initial_params()
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    state = init_train_state(params, rules_of(method), seed=0, mesh=mesh)
    step = make_train_step(CONFIG, rules_of(method), LossConfig(), mesh=mesh)
    losses = []
    for _, batch in zip(range(STEPS), array_batches(task_arrays(), batch_size=8, seed=0)(0)):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    kernel = state.params
    for key in WI_0:
        kernel = kernel[key]
    return {"losses": losses, "shard_shape": list(kernel.addressable_shards[0].data.shape)}


def trained_prompt(model_dir, mesh_shape=None, stops=(4,)):
    "The prompt after `train` runs to each of `stops` in turn (a later stop resumes the earlier run)."
    params = initial_params()
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    for train_steps in stops:
        result = train(CONFIG, params, prompt_tuning_rules(), array_batches(task_arrays(), batch_size=8, seed=0),
                       model_dir=model_dir, train_steps=train_steps, seed=0, loss=LossConfig(), checkpoint_every=2,
                       progress=False, mesh=mesh)
    return np.asarray(result.params["encoder"]["prompt"]["prompt"]["prompt"]).tolist()


def run_label(mesh_shape):
    return "1 device" if mesh_shape is None else f"mesh {mesh_shape[0]}x{mesh_shape[1]}"


def device_results(tmp_dir):
    "What one subprocess computes: with 1 device the unsharded steps and run, with 8 each mesh and a resumed run."
    meshes = [None] if jax.device_count() == 1 else list(MESHES)
    steps = {f"{method} {run_label(mesh)}": step_losses(method, mesh) for method in ("prompt", "model") for mesh in meshes}
    stops = (4,) if jax.device_count() == 1 else (2, 4)
    return {"devices": jax.device_count(), "steps": steps,
            "prompt": trained_prompt(Path(tmp_dir) / "run", meshes[0], stops=stops)}


@pytest.fixture(scope="module")
def on_devices(tmp_path_factory):
    "`results(n)`: `device_results` of a fresh interpreter with `n` simulated CPU devices (both started at once)."
    processes = {}
    for devices in (1, 8):
        tmp_dir = tmp_path_factory.mktemp(f"devices_{devices}")
        # A compilation cache lets `train` reuse the step `step_losses` compiled. XLA's backend optimizations only
        # make code faster and double the compile time, which is nearly all this test spends.
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
               "JAX_COMPILATION_CACHE_DIR": str(tmp_dir / "jax_cache"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_sharding; "
                f"print(json.dumps(test_sharding.device_results({str(tmp_dir)!r})))")
        processes[devices] = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)
    results = {}

    def wait(devices):
        if devices not in results:
            out, err = processes[devices].communicate(timeout=600)
            assert processes[devices].returncode == 0, err[-3000:]
            results[devices] = json.loads(out.strip().splitlines()[-1])
            assert results[devices]["devices"] == devices
        return results[devices]
    yield wait
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def relative_difference(a, b):
    "Largest relative difference of losses (or of whole arrays, by their norm)."
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim > 1:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


@pytest.mark.parametrize("method", ["prompt", "model"])
def test_same_losses_on_one_and_eight_devices(method, on_devices):
    one = on_devices(1)["steps"][f"{method} 1 device"]
    assert one["losses"][-1] != one["losses"][0]  # the steps do change the loss
    for data, model in MESHES:
        eight = on_devices(8)["steps"][f"{method} {run_label((data, model))}"]
        assert relative_difference(eight["losses"], one["losses"]) <= 1e-5, (data, model, eight, one)
        assert eight["shard_shape"] == [CONFIG.d_model, CONFIG.mlp_dim // model]  # really split over `model`


def test_sharded_train_resumes_to_the_single_device_prompt(on_devices):
    "`train` on mesh 2x4, interrupted after 2 steps and resumed, ends with the uninterrupted 1-device prompt."
    assert relative_difference(on_devices(8)["prompt"], on_devices(1)["prompt"]) <= 1e-5


def test_partition_rules_cover_every_parameter_of_every_preset():
    for name in t5.PRESETS:
        for decoder_only in (False, True):
            config = t5.T5Config.from_preset(name, decoder_only=decoder_only)
            shapes = jax.eval_shape(lambda: t5.init_params(config, jax.random.key(0), prompt_length=10))
            flat = {"/".join(str(k.key) for k in path): (x, spec) for path, x, spec in zip(
                [p for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]], jax.tree.leaves(shapes),
                jax.tree.leaves(param_specs(shapes, {"data": 1, "model": 2}),
                                is_leaf=lambda s: isinstance(s, PartitionSpec)))}
            for path, (x, spec) in flat.items():
                if path.endswith("prompt/prompt/prompt"):
                    assert spec == PartitionSpec(), (name, path)
                elif len(x.shape) == 2:  # every matrix splits over `model` (all dimensions are even)
                    assert "model" in spec, (name, decoder_only, path, spec)


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "model": 8}, {"data": 4, "model": 8}])
def test_xxl_memory_plan_without_allocating(mesh_shape, capsys):
    config = t5.T5Config.from_preset("xxl")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    plan = memory_plan(config, mesh_shape, prompt_length=100, optimizer_init=optax.adafactor(0.3, factored=False).init)
    assert time.perf_counter() - started < 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 2**20  # < 1 GiB for 44.5 GB of weights
    total = family.num_params(config, prompt_length=100)
    assert plan["devices"] == math.prod(mesh_shape.values())
    assert plan["total_parameters"] == total
    assert total * 4 / 8 <= plan["parameters"] <= total * 4 / 8 * 1.001  # every big array split 8 ways
    assert plan["gradients"] == 100 * 4096 * 4 and plan["trainable_parameters"] == 100 * 4096
    print_memory_plan(plan)
    assert f"devices {plan['devices']}" in capsys.readouterr().out
