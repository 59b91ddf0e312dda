"""Multi-host for real, on loopback: the gin CLI as two processes with 2 CPU devices each (JAX's multi-controller
runtime, gloo collectives) trains as one process with 4 devices does, each process scoring half of every evaluation,
writes each file once, stops soon after a process dies, and resumes from the last orbax checkpoint when run again."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

CONFIGS = "prompt_tuning_nb/configs"
REPO = Path(__file__).resolve().parents[1]
STEPS, CHECKPOINT_EVERY, HEARTBEAT = 20, 5, 10
PROMPT = "encoder.prompt.prompt.prompt"
RUN_SECONDS = 600
METRICS = ("accuracy", "macro_f1", "auc", "majority_accuracy", "examples")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _command(model_dir: Path, partitions: int, steps: int = STEPS) -> list:
    "The original's prompt-tuning command on a random miniature: evaluation at the start and the end."
    return [sys.executable, "-m", "prompt_tuning_nb.train",
            f"--gin_file={CONFIGS}/models/t5_1_1_mini_xs_prompt.gin", f"--gin_file={CONFIGS}/prompts/from_class_labels.gin",
            f"--gin_file={CONFIGS}/runs/prompt_finetune.gin", "--gin.CLASS_LABELS=['positive','negative']",
            "--gin.MIXTURE_OR_TASK_NAME='rt_polarity'", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
            "--gin.INITIAL_CHECKPOINT_PATH=None", "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 4}",
            "--gin.BATCH_SIZE=8", "--gin.EVALUATOR_NUM_EXAMPLES=16", "--gin.PROMPT_LENGTH=4",
            f"--gin.gin_glue.run_train.checkpoint_period={CHECKPOINT_EVERY}", "--gin.gin_glue.run_train.log_every=1",
            f"--gin.gin_glue.run_train.num_partitions={partitions}", "--gin.gin_glue.run_train.data_shards=2",
            "--gin.gin_glue.run_train.progress=False"]


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _start(model_dir: Path, partitions: int, logs: Path) -> list:
    "Two processes of the command, joined on a free loopback port; their output goes to `{logs}.process{index}.log`."
    port = _free_port()
    processes = []
    for index in range(2):
        with open(f"{logs}.process{index}.log", "w") as log:
            processes.append(subprocess.Popen(
                [*_command(model_dir, partitions), "--multihost", f"--coordinator_address=127.0.0.1:{port}",
                 "--num_processes=2", f"--process_id={index}", f"--heartbeat_timeout_seconds={HEARTBEAT}"],
                cwd=REPO, env=_env(2), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return processes


def _stop(processes: list):
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _two_processes(model_dir: Path, partitions: int, logs: Path):
    processes = _start(model_dir, partitions, logs)
    try:
        codes = [process.wait(timeout=RUN_SECONDS) for process in processes]
    finally:
        _stop(processes)
    assert codes == [0, 0], Path(f"{logs}.process0.log").read_text()[-3000:]


def _one_process(model_dir: Path, partitions: int):
    run = subprocess.run(_command(model_dir, partitions), cwd=REPO, env=_env(4), capture_output=True, text=True,
                         timeout=RUN_SECONDS)
    assert run.returncode == 0, run.stderr[-3000:]


def _records(model_dir: Path) -> list:
    return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]


def _prompt(model_dir: Path, step: int = STEPS) -> np.ndarray:
    return np.load(model_dir / "numpy_checkpoints" / f"checkpoint_{step}" / PROMPT)


def _exports(model_dir: Path) -> list:
    return sorted(p.relative_to(model_dir).as_posix() for p in (model_dir / "numpy_checkpoints").rglob("*") if p.is_file())


def _assert_same_run(many: Path, one: Path):
    records, reference = _records(many), _records(one)
    assert [(r["step"], r["split"]) for r in records] == [(r["step"], r["split"]) for r in reference]  # each once
    losses = np.array([[r["loss"], s["loss"]] for r, s in zip(records, reference) if r["split"] == "train"])
    np.testing.assert_allclose(losses[:, 0], losses[:, 1], rtol=1e-5)
    for r, s in zip(records, reference):  # each process scored half the examples; together, the same metrics
        if r["split"] == "validation":
            assert {k: r[k] for k in METRICS} == pytest.approx({k: s[k] for k in METRICS}, abs=1e-6), (r, s)
    reference = _prompt(one)  # within 1e-5 of the prompt's largest entry (float32 sums in another order)
    np.testing.assert_allclose(_prompt(many), reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    assert _exports(many) == _exports(one)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    "The one-process runs (4 devices, 2 data shards), the reference of every multi-process run: mesh 4x1 and 2x2."
    root = tmp_path_factory.mktemp("single")
    runs = {partitions: root / f"partitions{partitions}" for partitions in (1, 2)}
    for partitions, folder in runs.items():
        _one_process(folder, partitions)
    return runs


@pytest.mark.parametrize("partitions", [1, 2], ids=["mesh4x1", "mesh2x2"])
def test_two_processes_train_as_one_and_write_each_file_once(tmp_path, single, partitions):
    model_dir = tmp_path / "run"
    _two_processes(model_dir, partitions, tmp_path / "run")
    _assert_same_run(model_dir, single[partitions])
    assert {f"numpy_checkpoints/checkpoint_{step}/{PROMPT}" for step in range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY)} <= \
        set(_exports(model_dir))
    logs = [(tmp_path / f"run.process{index}.log").read_text() for index in (0, 1)]
    assert "saved the random model" in logs[0] and "saved the random model" not in logs[1]  # process 0 writes
    assert f"{STEPS} steps; prompt" in logs[0] and f"{STEPS} steps; prompt" not in logs[1]
    assert all("rt_polarity validation: 16 examples, 8 scored by each process of 2" in log for log in logs)


def test_a_lost_process_stops_the_other_and_the_rerun_resumes(tmp_path, single):
    model_dir = tmp_path / "run"
    processes = _start(model_dir, 1, tmp_path / "killed")
    try:
        deadline = time.monotonic() + RUN_SECONDS
        while not (model_dir / "checkpoints" / str(CHECKPOINT_EVERY)).is_dir():
            assert time.monotonic() < deadline and processes[0].poll() is None, \
                (tmp_path / "killed.process0.log").read_text()[-3000:]
            time.sleep(0.1)
        processes[1].kill()
        killed = time.monotonic()
        code = processes[0].wait(timeout=HEARTBEAT + 50)
        detected = time.monotonic() - killed
    finally:
        _stop(processes)
    log = (tmp_path / "killed.process0.log").read_text()
    assert code != 0, log[-3000:]
    reason = next((line for line in log.splitlines() if "heartbeat" in line or "train: error" in line), "")
    print(f"process 0 stopped {detected:.1f} s after process 1 was killed (heartbeat timeout {HEARTBEAT} s): {reason}")
    assert detected < HEARTBEAT + 50
    done = max(int(step.name) for step in (model_dir / "checkpoints").iterdir() if step.name.isdigit())
    assert done < STEPS  # killed mid-run

    _two_processes(model_dir, 1, tmp_path / "resumed")  # the same command again: resumes from checkpoint `done`
    assert f"{STEPS} steps; prompt" in (tmp_path / "resumed.process0.log").read_text()
    _assert_same_run(model_dir, single[1])
