"""Train-step throughput: this project's prompt and model tuning against Hugging Face PEFT's prompt tuning and torch fine-tuning.

Run from a checkout: `.venv/bin/python benchmarks/step_throughput.py [--model t5] [--steps 10] [--warmup 3]`.

`--model t5` (the default): one T5 1.1 (d_model 256, 4+4 layers, 4 heads of 64, gated-GELU MLP 1024, vocabulary 8000, untied output
layer, dropout 0.1), batch 32, inputs of 128 tokens (no padding), targets of 8, a 20-token prompt. Each
measurement runs in a fresh interpreter, so its peak RSS is its own and no other framework's thread pool
is alive. Optimizers follow the paper on both sides: Adafactor for the prompt (constant rate 0.3, decay
rate 0.8, weight decay 1e-5, no parameter scaling) and T5X's default Adafactor (rate 1e-3, parameter
scaling) for model tuning; torch uses `transformers.optimization.Adafactor` with the same settings (it
factors the prompt's second moment, which costs nothing measurable at this size).

`--model smollm2_135m`: the packaged SmolLM2-135M Instruct (30 layers, d_model 576, 9 query and 3 key-value
heads, SwiGLU 1536, vocabulary 49,152, tied embedding), read from its GGUF file by both sides (ours with
`load_model`, torch with transformers' `from_pretrained(gguf_file=)`), in float32, no dropout (the model
has none); batch 16 of 64 random tokens, the loss on every next token (PEFT's `labels = input_ids`), a
20-token prompt in front. The same optimizers as for T5.

Model FLOPs are counted analytically (every matmul, 2 FLOPs per multiply-add): a forward pass, the
backward pass to the activations, and, when weights train, the weight gradients. Attention-score matmuls
have no weights and need both input gradients. XLA's own count of the compiled forward and backward pass
is printed as a cross-check. The machine's float32 matmul rate is measured in the same run with jitted
`jnp.matmul`s of a few sizes (the best one counts).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

MODEL = dict(vocab_size=8000, d_model=256, num_heads=4, head_dim=64, num_encoder_layers=4, num_decoder_layers=4,
             mlp_dim=1024)
BATCH, INPUT_LENGTH, TARGET_LENGTH, PROMPT_LENGTH = 32, 128, 8, 20
DROPOUT = 0.1
LLAMA_BATCH, LLAMA_LENGTH = 16, 64  # SmolLM2: rows, tokens per row (the prompt comes on top)
MODELS = ("t5", "smollm2_135m")
RUNS = {  # name: what runs
    "matmul": "jitted jnp.matmul, float32, square sizes",
    "ours prompt": "this project, prompt tuning (jitted step)",
    "ours model": "this project, model tuning (jitted step)",
    "peft prompt eager": "Hugging Face PEFT prompt tuning, torch eager",
    "peft prompt compiled": "Hugging Face PEFT prompt tuning, torch.compile",
    "torch model eager": "Hugging Face full fine-tuning, torch eager",
}


def synthetic_batch(seed: int = 0) -> dict:
    "Random inputs `[B, 128]` and targets `[B, 8]`, each ending in EOS (1), no padding."
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, MODEL["vocab_size"], (BATCH, INPUT_LENGTH)).astype(np.int32)
    targets = rng.integers(2, MODEL["vocab_size"], (BATCH, TARGET_LENGTH)).astype(np.int32)
    inputs[:, -1] = targets[:, -1] = 1
    return {"encoder_input_tokens": inputs, "decoder_target_tokens": targets}


def model_flops(prompt_length: int, trains_weights: bool) -> float:
    "Matmul FLOPs of one train step (forward, backward to activations, weight gradients if `trains_weights`)."
    d, inner, mlp, vocab = MODEL["d_model"], MODEL["num_heads"] * MODEL["head_dim"], MODEL["mlp_dim"], MODEL["vocab_size"]
    s, t = INPUT_LENGTH + prompt_length, TARGET_LENGTH
    weight_macs = (MODEL["num_encoder_layers"] * s * (4 * d * inner + 3 * d * mlp)
                   + MODEL["num_decoder_layers"] * (t * (4 * d * inner + 2 * d * inner + 3 * d * mlp) + s * 2 * d * inner)
                   + t * d * vocab)
    score_macs = MODEL["num_encoder_layers"] * s * 2 * s * inner + MODEL["num_decoder_layers"] * t * 2 * (t + s) * inner
    passes = 3 if trains_weights else 2
    return 2.0 * BATCH * (weight_macs * passes + score_macs * 3)


def llama_config_and_params():
    "SmolLM2's config and float32 parameters, read from the packaged GGUF file."
    from prompt_tuning_nb import load_model

    model = load_model("smollm2_135m")
    return model.config, model.params


def llama_batch(vocab_size: int, seed: int = 0) -> np.ndarray:
    "Random tokens `[16, 65]` (no padding): 64 positions to run, and the next token of the last one."
    return np.random.default_rng(seed).integers(3, vocab_size, (LLAMA_BATCH, LLAMA_LENGTH + 1)).astype(np.int32)


def llama_flops(config, prompt_length: int, trains_weights: bool) -> float:
    "Matmul FLOPs of one SmolLM2 train step: the layers over prompt and tokens, the output layer over the tokens."
    s = LLAMA_LENGTH + prompt_length
    inner, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    weight_macs = (s * config.num_layers * (2 * config.d_model * inner + 2 * config.d_model * kv
                                            + 3 * config.d_model * config.mlp_dim)
                   + LLAMA_LENGTH * config.d_model * config.vocab_size)
    score_macs = config.num_layers * s * 2 * s * inner  # causal attention counted in full
    passes = 3 if trains_weights else 2
    return 2.0 * LLAMA_BATCH * (weight_macs * passes + score_macs * 3)


def time_steps(step, steps: int, warmup: int) -> dict:
    "Run `step()` (which must block until done) `warmup` then `steps` times; per-step wall and process CPU seconds."
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_seconds = time.perf_counter() - started
    walls, cpus = [], []
    for _ in range(steps):
        cpu, wall = time.process_time(), time.perf_counter()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"seconds": statistics.median(walls), "min_seconds": min(walls), "max_seconds": max(walls),
            "cpu_per_wall": statistics.median(c / w for c, w in zip(cpus, walls)), "warmup_seconds": warmup_seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def matmul_rate() -> dict:
    "Measured float32 matmul FLOP/s of jitted `jnp.matmul` (best over sizes)."
    import jax
    import jax.numpy as jnp
    rates = {}
    for n in (512, 1024, 2048, 3072):
        a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in (0, 1))
        matmul = jax.jit(jnp.matmul)
        matmul(a, b).block_until_ready()
        repeats = max(3, int(2e10 / (2 * n ** 3)))
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            matmul(a, b).block_until_ready()
            times.append(time.perf_counter() - started)
        rates[n] = 2 * n ** 3 / statistics.median(times)
    return {"flops_per_second": max(rates.values()), "by_size": rates}


def ours_model_and_batch(model: str, prompt_length: int) -> tuple:
    "`(config, params, batch)` of this project's side: T5 from a seed, or SmolLM2 from its GGUF file."
    import jax

    from prompt_tuning_nb import family, t5

    if model == "t5":
        config = t5.T5Config(**MODEL, dropout_rate=DROPOUT)
        return config, t5.init_params(config, jax.random.key(0), prompt_length=prompt_length), synthetic_batch()
    config, params = llama_config_and_params()
    if prompt_length:
        rows = np.random.default_rng(1).integers(3, 5003, prompt_length)  # a sampled-vocab prompt
        params = family.with_prompt(config, params, np.asarray(family.embedding_of(config, params))[rows])
    tokens = llama_batch(config.vocab_size)
    return config, params, {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
                            "decoder_loss_weights": np.ones(tokens[:, 1:].shape, np.float32)}  # [16, 64] each


def run_ours(model: str, prompt_tuning: bool, steps: int, warmup: int) -> dict:
    import jax

    from prompt_tuning_nb.formats.tree import flatten_params, unflatten_params
    from prompt_tuning_nb.training.optim import model_tuning_rules, prompt_tuning_rules, trainable_paths
    from prompt_tuning_nb.family import family_of
    from prompt_tuning_nb.training.step import LossConfig, init_train_state, loss_fn, make_train_step

    config, params, batch = ours_model_and_batch(model, PROMPT_LENGTH if prompt_tuning else 0)
    rules = prompt_tuning_rules() if prompt_tuning else model_tuning_rules()
    step = make_train_step(config, rules, LossConfig())
    state = init_train_state(params, rules, seed=0)
    losses = []

    def one_step():
        nonlocal state
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))  # blocks until the step is done

    result = time_steps(one_step, steps, warmup)

    # XLA's FLOP count of the same forward and backward pass (a cross-check of the analytic count)
    names = set(trainable_paths(params, rules))
    flat = flatten_params(params)
    trainable = {p: v for p, v in flat.items() if p in names}
    frozen = {p: v for p, v in flat.items() if p not in names}

    def gradients(trainable, frozen, batch, key):
        objective = lambda t: loss_fn(config, unflatten_params({**frozen, **t}), batch, LossConfig(), dropout_rng=key)[0]
        return jax.value_and_grad(objective)(trainable)

    analysis = jax.jit(gradients).lower(trainable, frozen, family_of(config).model_batch(batch), jax.random.key(0)).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return {**result, "xla_flops": float(analysis.get("flops", float("nan"))), "first_loss": losses[0],
            "last_loss": losses[-1], "versions": f"jax {jax.__version__}"}


def torch_model_and_batch(model: str) -> tuple:
    "`(model, peft task type, inputs)` of the torch side: a random T5, or SmolLM2 read by transformers from its GGUF file."
    import torch
    import transformers

    torch.manual_seed(0)
    if model == "smollm2_135m":
        from prompt_tuning_nb.data.sources import source_path

        path = source_path("smollm2_135m_instruct")
        llama = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  torch_dtype=torch.float32)
        tokens = torch.from_numpy(llama_batch(llama.config.vocab_size)[:, :-1].astype(np.int64))  # [16, 64]
        return llama, "CAUSAL_LM", {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
    config = transformers.T5Config(
        vocab_size=MODEL["vocab_size"], d_model=MODEL["d_model"], d_kv=MODEL["head_dim"], d_ff=MODEL["mlp_dim"],
        num_layers=MODEL["num_encoder_layers"], num_decoder_layers=MODEL["num_decoder_layers"],
        num_heads=MODEL["num_heads"], relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=DROPOUT, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)
    t5 = transformers.T5ForConditionalGeneration(config)
    # transformers 5 ties T5's lm_head to the input embedding whatever the config says: untie it by hand
    t5.lm_head.weight = torch.nn.Parameter(torch.randn_like(t5.lm_head.weight) * MODEL["d_model"] ** -0.5)
    assert t5.lm_head.weight is not t5.shared.weight
    batch = synthetic_batch()
    input_ids = torch.from_numpy(batch["encoder_input_tokens"].astype(np.int64))
    return t5, "SEQ_2_SEQ_LM", {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                                "labels": torch.from_numpy(batch["decoder_target_tokens"].astype(np.int64))}


def run_torch(model_name: str, prompt_tuning: bool, compiled: bool, steps: int, warmup: int) -> dict:
    import torch
    import transformers
    from transformers.optimization import Adafactor

    model, task_type, inputs = torch_model_and_batch(model_name)
    if prompt_tuning:
        import peft
        model = peft.get_peft_model(model, peft.PromptTuningConfig(task_type=task_type,
                                                                   num_virtual_tokens=PROMPT_LENGTH))
        optimizer = Adafactor([p for p in model.parameters() if p.requires_grad], lr=0.3, relative_step=False,
                              scale_parameter=False, warmup_init=False, decay_rate=-0.8, weight_decay=1e-5,
                              clip_threshold=1.0)
    else:
        optimizer = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=True,
                              warmup_init=False, decay_rate=-0.8, clip_threshold=1.0)
    model.train()
    forward = torch.compile(model) if compiled else model
    losses = []

    def one_step():
        loss = forward(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))

    result = time_steps(one_step, steps, warmup)
    import peft
    return {**result, "first_loss": losses[0], "last_loss": losses[-1],
            "versions": f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
                        f"{transformers.__version__}, peft {peft.__version__}"}


def worker(model: str, name: str, steps: int, warmup: int) -> dict:
    if name == "matmul":
        return matmul_rate()
    if name.startswith("ours"):
        return run_ours(model, name == "ours prompt", steps, warmup)
    return run_torch(model, name.startswith("peft prompt"), name.endswith("compiled"), steps, warmup)


def run_worker(name: str, args) -> dict:
    "`worker(name)` in a fresh interpreter."
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model", args.model,
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe(model: str) -> tuple:
    "`(one line on the setting, rows per batch, flops(prompt_length, trains_weights))` of `model`."
    if model == "t5":
        return (f"T5 1.1 d_model {MODEL['d_model']}, {MODEL['num_encoder_layers']}+{MODEL['num_decoder_layers']} "
                f"layers, {MODEL['num_heads']} heads of {MODEL['head_dim']}, MLP {MODEL['mlp_dim']}, vocab "
                f"{MODEL['vocab_size']} (untied), dropout {DROPOUT}; batch {BATCH}, input {INPUT_LENGTH}, target "
                f"{TARGET_LENGTH}, prompt {PROMPT_LENGTH} (prompt tuning only)"), BATCH, model_flops
    from prompt_tuning_nb.llama_layers import LlamaConfig, PRESETS

    config = LlamaConfig(**PRESETS["smollm2_135m"])
    return (f"SmolLM2-135M Instruct from its GGUF file (float32): {config.num_layers} layers, d_model "
            f"{config.d_model}, {config.num_heads} query / {config.num_kv_heads} key-value heads, SwiGLU "
            f"{config.mlp_dim}, vocab {config.vocab_size} (tied), no dropout; batch {LLAMA_BATCH} of {LLAMA_LENGTH} "
            f"tokens, loss on every next token, prompt {PROMPT_LENGTH} (prompt tuning only)"), LLAMA_BATCH, \
        lambda prompt_length, trains_weights: llama_flops(config, prompt_length, trains_weights)


def report(model: str, results: dict, load_before, load_after):
    rate = results["matmul"]["flops_per_second"]
    setting, rows, flops_of = describe(model)
    print("\n" + setting)
    print(f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; load average before "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in load_after)}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    versions = sorted({r["versions"] for r in results.values() if "versions" in r})
    print("; ".join(versions))
    if load_before[0] > 0.5 * os.cpu_count():  # (the load after includes this benchmark)
        print("WARNING: the machine was busy: torch's OpenMP threads in particular slow down many-fold when cores are "
              "shared; rerun on a quiet machine")
    sizes = ", ".join(f"{n}: {r / 1e9:.0f}" for n, r in results["matmul"]["by_size"].items())
    print(f"float32 matmul rate (jnp, GFLOP/s by size): {sizes}; best {rate / 1e9:.0f} GFLOP/s\n")
    baseline = {"ours prompt": "peft prompt eager", "ours model": "torch model eager"}
    header = (f"{'run':22s} {'s/step':>7s} {'ex/s':>6s} {'peak RSS':>9s} {'CPU/wall':>8s} {'GFLOP':>6s} "
              f"{'GFLOP/s':>7s} {'%matmul':>7s} {'vs PEFT eager':>13s} {'vs PEFT compiled':>16s} {'warmup s':>8s}")
    print(header)
    print("-" * len(header))
    for name in RUNS:
        if name == "matmul" or name not in results:
            continue
        r = results[name]
        flops = flops_of(PROMPT_LENGTH if "prompt" in name else 0, "model" in name)
        vs_eager = vs_compiled = ""
        if name in baseline and baseline[name] in results:
            vs_eager = f"{results[baseline[name]]['seconds'] / r['seconds']:.2f}x"
        if name == "ours prompt" and "peft prompt compiled" in results:
            vs_compiled = f"{results['peft prompt compiled']['seconds'] / r['seconds']:.2f}x"
        print(f"{name:22s} {r['seconds']:7.3f} {rows / r['seconds']:6.1f} {r['peak_rss_mib']:6.0f} MiB "
              f"{r['cpu_per_wall']:8.2f} {flops / 1e9:6.1f} {flops / r['seconds'] / 1e9:7.1f} "
              f"{100 * flops / r['seconds'] / rate:6.1f}% {vs_eager:>13s} {vs_compiled:>16s} {r['warmup_seconds']:8.1f}")
    print("\ns/step: median wall seconds; CPU/wall: process CPU seconds per wall second (cores busy); GFLOP: "
          "analytic matmul FLOPs per step;\n'vs' columns: baseline seconds / our seconds (ours model is compared with "
          "torch full fine-tuning, eager). Warmup includes compilation.\nOptimizers: Adafactor everywhere (ours: "
          "optax via training.optim recipes; torch: transformers.optimization.Adafactor, same settings).")
    for name in ("ours prompt", "ours model"):
        if name in results:
            analytic = flops_of(PROMPT_LENGTH if "prompt" in name else 0, "model" in name)
            print(f"{name}: XLA counts {results[name]['xla_flops'] / 1e9:.1f} GFLOP for the forward and backward pass "
                  f"(analytic {analytic / 1e9:.1f}); loss {results[name]['first_loss']:.2f} -> "
                  f"{results[name]['last_loss']:.2f}")
    if "ours prompt" in results:
        ours = results["ours prompt"]["seconds"]
        fraction = flops_of(PROMPT_LENGTH, False) / ours / rate
        checks = [("prompt tuning >= 2x PEFT eager", "peft prompt eager", 2.0),
                  ("prompt tuning >= 1.5x PEFT compiled", "peft prompt compiled", 1.5)]
        if model == "smollm2_135m":
            checks.insert(0, ("prompt tuning >= 1.5x PEFT eager (the Llama family's)", "peft prompt eager", 1.5))
        for label, other, target in checks:
            if other in results:
                ratio = results[other]["seconds"] / ours
                print(f"target {label}: {ratio:.2f}x, {'met' if ratio >= target else 'MISSED'}")
        print(f"target prompt tuning >= 50% of the matmul rate: {100 * fraction:.0f}%, "
              f"{'met' if fraction >= 0.5 else 'MISSED'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="t5", help="t5 (a random T5 1.1) or smollm2_135m "
                        "(the packaged GGUF)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of: {', '.join(RUNS)}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.worker, args.steps, args.warmup)))
        return
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RUNS))
    if unknown or args.steps < 1 or args.warmup < 1:
        parser.error(f"unknown runs {unknown}" if unknown else "--steps and --warmup must be at least 1")
    names = ["matmul"] + [n for n in names if n != "matmul"]
    load_before = os.getloadavg()
    results = {}
    for name in names:
        started = time.perf_counter()
        print(f"{name}: {RUNS[name]} ...", end=" ", flush=True)
        results[name] = run_worker(name, args)
        print(f"{time.perf_counter() - started:.0f} s", flush=True)
    report(args.model, results, load_before, os.getloadavg())


if __name__ == "__main__":
    main()
