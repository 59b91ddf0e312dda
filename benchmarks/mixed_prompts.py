"""Mixed-prompt inference: examples per second of one batch that mixes K prompts against batches of one prompt each.

Run from a checkout: `.venv/bin/python benchmarks/mixed_prompts.py [--model smollm2_135m] [--prompts 4] [--examples 256]`.

The same N real inputs (rt_polarity validation, in the model's text format) and K random prompts of 20
positions are scored two ways by rank classification (`training.evaluation.score_candidates`):

- single: the examples split into K groups, each group scored in its own batches with its prompt in the
  parameters, as a model served one task at a time does (PEFT's only way for prompt tuning,
  huggingface/peft#759);
- mixed: all N examples in one run of batches, each example with its own prompt (`prompts_KxPxD` and
  `prompt_ids_N`, picked inside the compiled call), the examples of the K prompts interleaved so that every
  batch holds all of them.

Both runs use the same batch size and the same length-sorted, trimmed batches, and are compiled first by an
untimed pass; each is then timed `--repeats` times and the median counts. The scores of the two runs must
agree (the benchmark fails otherwise). The target is a ratio of at least 0.9.
"""
import argparse
import statistics
import time

import numpy as np

TARGET = 0.9


def timed(fn, repeats: int) -> float:
    "Median seconds of `fn()` over `repeats` calls, after one untimed call (compilation)."
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m", help="anything `load_model` takes (a packaged LM, a zoo name)")
    parser.add_argument("--prompts", type=int, default=4, help="K, prompts mixed in one batch")
    parser.add_argument("--examples", type=int, default=256, help="N, rt_polarity validation examples scored")
    parser.add_argument("--batch_size", type=int, default=32, help="rows per call, both ways")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per way (the median counts)")
    args = parser.parse_args()

    import jax

    from prompt_tuning_nb import family, load_model
    from prompt_tuning_nb.data import label_words, task_arrays
    from prompt_tuning_nb.training.evaluation import label_candidates, score_candidates

    model = load_model(args.model)
    candidates = label_candidates(label_words("rt_polarity"), model.vocabulary)
    lengths = {"inputs": 64, "targets": candidates.shape[1]}
    inputs_NxT = task_arrays("rt_polarity", "validation", lengths, vocab=model.vocabulary)["encoder_input_tokens"]
    inputs_NxT = inputs_NxT[:args.examples]
    width = family.embedding_of(model.config, model.params).shape[1]
    prompts_KxPxD = np.asarray(jax.random.normal(jax.random.key(0), (args.prompts, 20, width))) * 0.1
    ids_N = np.arange(len(inputs_NxT)) % args.prompts  # interleaved: every batch holds every prompt
    groups = [np.flatnonzero(ids_N == k) for k in range(args.prompts)]

    def single():
        scores = np.zeros((len(inputs_NxT), len(candidates)), np.float32)
        for k, rows in enumerate(groups):
            params = family.with_prompt(model.config, model.params, prompts_KxPxD[k])
            scores[rows] = score_candidates(model.config, params, inputs_NxT[rows], candidates, batch_size=args.batch_size)
        return scores

    def mixed():
        return score_candidates(model.config, model.params, inputs_NxT, candidates, batch_size=args.batch_size,
                                prompts_KxPxD=prompts_KxPxD, prompt_ids_N=ids_N)

    np.testing.assert_allclose(mixed(), single(), rtol=1e-4, atol=1e-4)
    seconds = {"single": timed(single, args.repeats), "mixed": timed(mixed, args.repeats)}
    rate = {way: len(inputs_NxT) / s for way, s in seconds.items()}
    print(f"{args.model}: {len(inputs_NxT)} rt_polarity examples, K={args.prompts} prompts of 20, batch {args.batch_size}")
    print("| run | s per pass | examples/s |\n| --- | ---: | ---: |")
    for way in ("single", "mixed"):
        print(f"| {way} | {seconds[way]:.2f} | {rate[way]:.1f} |")
    ratio = rate["mixed"] / rate["single"]
    print(f"mixed / single examples/s: {ratio:.2f}x (target {TARGET}x): {'MET' if ratio >= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
