"""JupyterLab as the front end: `make lab` starts a server on this environment; a notebook run through the server's
own kernel API shows the trainer's widget bar and live plot; headless Chromium renders the scale notebook in
JupyterLab itself."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVER_START_SECONDS, RUN_SECONDS = 120, 300
URL = re.compile(r"http://127\.0\.0\.1:(\d+)/lab\?token=([0-9a-f]+)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """`make lab` on a free loopback port, its workspaces and runtime files in a temporary folder: `(port, token)`
    from the URL it prints. The whole process group is stopped at the end, passed or failed."""
    state = tmp_path_factory.mktemp("jupyter")
    log = state / "lab.log"
    env = {**os.environ, "JUPYTERLAB_WORKSPACES_DIR": str(state), "JUPYTER_RUNTIME_DIR": str(state),
           "JUPYTER_CONFIG_DIR": str(state / "config")}
    with open(log, "w") as out:
        process = subprocess.Popen(["make", "-s", "lab", f"LAB_PORT={_free_port()}"], cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, found = time.monotonic() + SERVER_START_SECONDS, None
        while found is None and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
            found = URL.search(log.read_text())
        assert found, f"`make lab` printed no URL with a token within {SERVER_START_SECONDS} s:\n{log.read_text()[-3000:]}"
        port, token = found.groups()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=10) as reply:
            assert reply.status == 200  # the printed URL works
        yield int(port), token
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _api(port: int, token: str, method: str, path: str, body=None) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        text = reply.read()
    return json.loads(text) if text else {}


def _execute(socket_, code: str) -> list:
    """Run `code` in the kernel over the server's websocket (Jupyter messaging, JSON): the iopub messages it caused,
    until the kernel is idle again."""
    msg_id = uuid.uuid4().hex
    socket_.send(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex, "msg_type": "execute_request",
                   "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False,
                    "stop_on_error": True}}))
    messages, deadline = [], time.monotonic() + RUN_SECONDS
    while time.monotonic() < deadline:
        message = json.loads(socket_.recv())
        if message.get("parent_header", {}).get("msg_id") != msg_id or message.get("channel") != "iopub":
            continue
        messages.append(message)
        if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            return messages
    raise AssertionError(f"the kernel did not finish within {RUN_SECONDS} s: {messages[-5:]}")


def _errors(messages: list) -> list:
    return [f"{m['content']['ename']}: {m['content']['evalue']}" for m in messages if m["msg_type"] == "error"]


TRAINING = """
import jax, numpy as np, tempfile
from prompt_tuning_nb import t5
from prompt_tuning_nb.training import (EarlyStopping, LossConfig, array_batches, classification_evaluator,
                                       prompt_tuning_rules, train)
config = t5.T5Config(vocab_size=32, d_model=16, num_heads=2, head_dim=8, num_encoder_layers=1, num_decoder_layers=1,
                     mlp_dim=32)
params = t5.init_params(config, jax.random.key(0), prompt_length=2)
rng = np.random.default_rng(0)
inputs = np.concatenate([rng.integers(5, 32, (64, 5)), np.ones((64, 1), int)], axis=1)
labels = (inputs[:, 0] < 18).astype(int)
targets = np.stack([3 + labels, np.ones(64, int)], axis=1)
batches = array_batches({"encoder_input_tokens": inputs, "decoder_target_tokens": targets}, batch_size=16, seed=0)
evaluate = classification_evaluator(config, inputs, labels, np.array([[3, 1], [4, 1]]), batch_size=64)
result = train(config, params, prompt_tuning_rules(), batches, model_dir=tempfile.mkdtemp(), train_steps=20, seed=0,
               loss=LossConfig(), checkpoint_every=20, evaluate=evaluate, eval_every=10,
               early_stopping=EarlyStopping("accuracy"))
print("trained to step", result.step)
"""


def test_a_notebook_run_through_the_servers_kernel_shows_the_widget_bar_and_the_live_plot(lab):
    websocket = pytest.importorskip("websocket")
    port, token = lab
    session = _api(port, token, "POST", "/api/sessions", {
        "path": "experiments/jupyterlab_check.ipynb", "name": "jupyterlab_check.ipynb", "type": "notebook",
        "kernel": {"name": "prompt_tuning_nb"}})  # as JupyterLab opens a notebook: a session, its kernel
    kernel = session["kernel"]["id"]
    socket_ = websocket.create_connection(f"ws://127.0.0.1:{port}/api/kernels/{kernel}/channels",
                                          header=[f"Authorization: token {token}"], timeout=RUN_SECONDS)
    try:
        found = _execute(socket_, "import sys, prompt_tuning_nb; print(sys.executable); print(prompt_tuning_nb.__file__)")
        assert not _errors(found), _errors(found)
        printed = "".join(m["content"]["text"] for m in found if m["msg_type"] == "stream").split()
        assert Path(printed[0]).resolve() == (REPO / ".venv" / "bin" / "python").resolve()  # the project's kernel
        assert Path(printed[1]).resolve() == REPO / "prompt_tuning_nb" / "__init__.py"

        found = _execute(socket_, TRAINING)
        assert not _errors(found), _errors(found)
        shown = [m for m in found if m["msg_type"] in ("display_data", "update_display_data")]
        bars = [m for m in shown if "application/vnd.jupyter.widget-view+json" in m["content"]["data"]]
        assert bars, "no widget progress bar was displayed (is ipywidgets installed?)"
        opened = [m["content"]["data"]["state"] for m in found if m["msg_type"] == "comm_open"]
        assert any(state.get("_model_name") == "FloatProgressModel" and state.get("max") == 20 for state in opened), opened
        plots = [m for m in shown if "image/png" in m["content"]["data"]]
        assert [m["msg_type"] for m in plots] == ["display_data", "update_display_data", "update_display_data"]
        assert len({m["content"]["transient"]["display_id"] for m in plots}) == 1  # one plot, updated in place
        assert "trained to step 20" in "".join(m["content"]["text"] for m in found if m["msg_type"] == "stream")
    finally:
        socket_.close()
        _api(port, token, "DELETE", f"/api/sessions/{session['id']}")


def test_jupyterlab_renders_the_scale_notebook_in_headless_chromium(lab):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "no chromium: install Debian's chromium (`apt-get install chromium`, as .ci/run does)"
    port, token = lab
    notebook = REPO / "experiments" / "scale.ipynb"
    before = notebook.read_bytes()
    url = f"http://127.0.0.1:{port}/lab/tree/experiments/scale.ipynb?token={token}"
    options = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000", "--virtual-time-budget=30000"]
    screenshot = REPO / "build" / "jupyterlab" / "scale_notebook.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    subprocess.run([browser, *options, f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=120)
    dom = subprocess.run([browser, *options, "--dump-dom", url], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    cells = [names for names in re.findall(r'class="([^"]*)"', dom) if "jp-Cell" in names.split()]
    assert len(cells) == len(json.loads(before)["cells"]), f"JupyterLab rendered {len(cells)} cells"
    assert "Prompt tuning closes the gap with scale" in dom and "Python (prompt_tuning_nb)" in dom
    assert screenshot.read_bytes()[:4] == b"\x89PNG" and screenshot.stat().st_size > 50_000
    assert notebook.read_bytes() == before  # opened, not saved
