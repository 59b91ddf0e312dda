"""The gin glue and `python -m prompt_tuning_nb.train`: one-line configuration errors, model sizes, multi-host
start-up, and the original's prompt-tuning command end to end on a random miniature, then `prompt_eval.gin`."""
import contextlib
import io
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest

from prompt_tuning_nb import gin_glue, t5
from prompt_tuning_nb import train as train_cli

CONFIGS = "prompt_tuning_nb/configs"
MODEL = f"--gin_file={CONFIGS}/models/t5_1_1_mini_xs_prompt.gin"
CLASS_LABELS = f"--gin_file={CONFIGS}/prompts/from_class_labels.gin"
FINETUNE = f"--gin_file={CONFIGS}/runs/prompt_finetune.gin"
FLAGS = ["--gin.CLASS_LABELS=['positive','negative']", "--gin.MIXTURE_OR_TASK_NAME='rt_polarity'",
         "--gin.MODEL_DIR='/tmp/never_written_by_these_tests'", "--gin.TRAIN_STEPS=3",
         "--gin.INITIAL_CHECKPOINT_PATH=None"]


def run_main(argv):
    "`(exit status, stderr)` of `train.main(argv)` run in process."
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            train_cli.main(argv)
        except SystemExit as e:
            return e.code, err.getvalue()
        finally:
            gin.clear_config()
    return 0, err.getvalue()


def one_error_line(argv) -> str:
    code, message = run_main(argv)
    assert code == 1, message
    assert message.startswith("train: error: ") and message.count("\n") == 1, message
    return message.strip()


def test_missing_required_macro_is_one_line():
    message = one_error_line([MODEL, CLASS_LABELS, FINETUNE] + [f for f in FLAGS if "MODEL_DIR" not in f])
    assert message == ("train: error: missing required macro MODEL_DIR: set it with --gin.MODEL_DIR=... "
                       f"(required by {CONFIGS}/runs/prompt_finetune.gin)")
    message = one_error_line([MODEL, CLASS_LABELS, FINETUNE] + [f for f in FLAGS if "CLASS_LABELS" not in f])
    assert "missing required macro CLASS_LABELS" in message and "prompts/from_class_labels.gin" in message
    message = one_error_line([MODEL, f"--gin_file={CONFIGS}/runs/prompt_eval.gin", "--gin.MIXTURE_OR_TASK_NAME='x'",
                              "--gin.PROMPT_FILE='/p'", "--gin.INITIAL_CHECKPOINT_PATH='/c'"])
    assert "missing required macro CHECKPOINT_PATH" in message and "as t5x.eval does" in message


def test_unknown_parameter_or_macro_is_one_line():
    message = one_error_line([MODEL, CLASS_LABELS, FINETUNE] + FLAGS + ["--gin.gin_glue.run_train.learning_rate=1.0"])
    assert message.startswith("train: error: --gin.gin_glue.run_train.learning_rate = 1.0: Configurable "
                              "'gin_glue.run_train' doesn't have a parameter named 'learning_rate'")
    message = one_error_line([MODEL, CLASS_LABELS, FINETUNE] + FLAGS + ["--gin.no_such.thing=1"])
    assert "--gin.no_such.thing = 1:" in message and "no_such" in message
    message = one_error_line([MODEL, CLASS_LABELS, FINETUNE] + FLAGS + ["--gin.TRAIN_STEPZ=3"])
    assert message.endswith("no gin file defines or uses the macro TRAIN_STEPZ; did you mean TRAIN_STEPS?")


def test_bad_file_or_value_is_one_line(tmp_path):
    message = one_error_line([MODEL.replace("mini_xs", "nano"), FINETUNE] + FLAGS)
    assert message.startswith(f"train: error: --gin_file={CONFIGS}/models/t5_1_1_nano_prompt.gin: not found")
    bad = tmp_path / "bad.gin"
    bad.write_text("from __gin__ import dynamic_registration\nfrom prompt_tuning_nb import gin_glue\n"
                   "gin_glue.run_eval.no_such_parameter = 3\n")
    message = one_error_line([f"--gin_file={bad}"])
    assert "doesn't have a parameter named 'no_such_parameter'" in message and str(bad) in message
    message = one_error_line([MODEL, CLASS_LABELS, FINETUNE] + FLAGS + ["--gin.MODEL_DIR=/tmp/x"])
    assert "--gin.MODEL_DIR = /tmp/x: cannot parse the value" in message
    message = one_error_line([MODEL, CLASS_LABELS, FINETUNE] + FLAGS + ["--gin.TRAIN_STEPS"])
    assert message == "train: error: --gin.TRAIN_STEPS: expected --gin.NAME=VALUE (one argument, with '=')"


def test_a_run_error_is_one_line(tmp_path):
    np.save(tmp_path / "p.npy", np.zeros((100, 64), np.float32))
    message = one_error_line([MODEL, f"--gin_file={CONFIGS}/runs/prompt_eval.gin", "--gin.MIXTURE_OR_TASK_NAME='x'",
                              f"--gin.PROMPT_FILE='{tmp_path}/p.npy'", f"--gin.CHECKPOINT_PATH='{tmp_path}'"])
    assert "not a T5X checkpoint folder" in message and "(in " in message


@pytest.mark.parametrize("size", ["small", "base", "large", "xl", "xxl", "mini_xs", "mini_s", "mini_m", "mini_l"])
def test_model_files_match_the_presets(size):
    gin_glue.parse_gin([f"{CONFIGS}/models/t5_1_1_{size}_prompt.gin"])
    try:
        assert gin.query_parameter("%MODEL").scoped_configurable_fn() == t5.T5Config.from_preset(size)
    finally:
        gin.clear_config()


def test_multihost_initializes_jax_distributed_once(monkeypatch):
    calls = []
    monkeypatch.setattr(train_cli.jax.distributed, "initialize", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(train_cli.jax.distributed, "is_initialized", lambda: bool(calls))
    for _ in range(2):
        code, message = run_main(["--multihost", MODEL])  # no runs/*.gin file: stops after start-up
        assert code == 1 and "no run is configured" in message
    assert calls == [1]


def test_multihost_flags_are_checked_in_one_line():
    assert one_error_line(["--num_processes=2", MODEL]) == \
        "train: error: --coordinator_address, --num_processes and --process_id need --multihost"
    assert one_error_line(["--multihost", "--coordinator_address=127.0.0.1:1", "--num_processes=2", MODEL]) == \
        "train: error: --coordinator_address, --num_processes and --process_id go together: --process_id missing"
    assert one_error_line(["--multihost", "--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2",
                           MODEL]) == "train: error: --process_id must be in 0..1, got 2"


@pytest.mark.slow
def test_prompt_finetune_then_prompt_eval_end_to_end(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    package = subprocess.run([sys.executable, "-m", "prompt_tuning_nb.scripts.find_module", "prompt_tuning_nb"],
                             capture_output=True, text=True, check=True, cwd=tmp_path, env=env).stdout.strip()
    model_dir = tmp_path / "run"
    small = ["--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 4}", "--gin.BATCH_SIZE=8",
             "--gin.EVALUATOR_NUM_EXAMPLES=32", "--gin.PROMPT_LENGTH=20"]
    train = subprocess.run(
        [sys.executable, "-m", "prompt_tuning_nb.train", f"--gin_search_paths={package}/..", MODEL, CLASS_LABELS,
         FINETUNE, "--gin.CLASS_LABELS=['positive','negative']", "--gin.MIXTURE_OR_TASK_NAME='rt_polarity'",
         f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=3", "--gin.INITIAL_CHECKPOINT_PATH=None", *small],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    prompt_file = model_dir / "numpy_checkpoints" / "checkpoint_3" / "encoder.prompt.prompt.prompt"
    assert np.load(prompt_file).shape == (20, 64)
    assert (model_dir / "checkpoint_0" / "checkpoint").is_file()  # the random model, saved for the evaluation
    config = " ".join((model_dir / "config.gin").read_text().replace("\\\n", " ").split())  # gin wraps long lines
    assert f"INITIAL_CHECKPOINT_PATH = '{model_dir}/checkpoint_0'" in config
    assert f"3 steps; prompt {prompt_file}" in train.stdout

    evaluation = subprocess.run(
        [sys.executable, "-m", "prompt_tuning_nb.train", MODEL, f"--gin_file={CONFIGS}/runs/prompt_eval.gin",
         "--gin.MIXTURE_OR_TASK_NAME='rt_polarity'", f"--gin.CHECKPOINT_PATH='{model_dir}/checkpoint_0'",
         f"--gin.PROMPT_FILE='{prompt_file}'", f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'", *small],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    printed = json.loads(evaluation.stdout.strip().splitlines()[-1])
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    logged = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    at_step_3 = [r for r in logged if r["step"] == 3 and r["split"] == "validation"][0]
    assert printed == written
    for name in ("accuracy", "macro_f1", "auc"):  # the exported prompt on the saved model scores as in training
        assert written[name] == pytest.approx(at_step_3[name], abs=1e-6)

    infer = ["--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 8}", "--gin.BATCH_SIZE=8",
             "--gin.EVALUATOR_NUM_EXAMPLES=6", "--gin.PROMPT_LENGTH=20", "--gin.MIXTURE_OR_TASK_SPLIT='validation'",
             f"--gin.CHECKPOINT_PATH='{model_dir}/checkpoint_0'", f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'infer'}'"]
    np.save(tmp_path / "trec.npy", -np.load(prompt_file))  # a stand-in prompt for a second task
    mixed = {"rt_polarity": str(prompt_file), "trec": str(tmp_path / "trec.npy")}
    for name, prompt in (("mixed", mixed), ("rt_polarity", str(prompt_file))):
        gin_glue.parse_gin([f"{CONFIGS}/models/t5_1_1_mini_xs_prompt.gin", f"{CONFIGS}/runs/prompt_infer.gin"],
                           [*[flag.removeprefix("--gin.") for flag in infer], f"MIXTURE_OR_TASK_NAME = '{name}'",
                            f"PROMPT_FILE = {prompt!r}"])
        gin_glue.run_configured()
        gin.clear_config()
    records = [json.loads(line) for line in (tmp_path / "infer" / "mixed-validation.jsonl").read_text().splitlines()]
    alone = [json.loads(line) for line in (tmp_path / "infer" / "rt_polarity-validation.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["rt_polarity", "trec"] * 6  # every batch of 8 mixes the two tasks
    assert {len(r["scores"]) for r in records if r["task"] == "trec"} == {6}
    np.testing.assert_allclose([r["scores"] for r in records if r["task"] == "rt_polarity"],
                               [r["scores"] for r in alone], rtol=1e-4)  # as if rt_polarity ran alone with its prompt
