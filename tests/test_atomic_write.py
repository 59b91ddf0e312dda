"""Atomic writes: a writer killed halfway leaves the previous file; every writer of the package uses the one helper."""
import re
import signal
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prompt_tuning_nb"
HELPER = PACKAGE / "formats" / "atomic.py"

HALF_WRITTEN_THEN_KILLED = """
import sys, time
from prompt_tuning_nb.formats.atomic import atomic_folder, atomic_write
kind, target = sys.argv[1], sys.argv[2]
with (atomic_write if kind == "file" else atomic_folder)(target) as temporary:
    if kind == "file":
        with open(temporary, "wb") as f:
            f.write(b"half of the new")
            f.flush()
    else:
        (temporary / "weights").write_bytes(b"half of the new")
    print("written", flush=True)
    time.sleep(60)
"""


def _kill_halfway(kind: str, target: Path):
    """Start a writer of `target`, SIGKILL it once it has written half of the new content."""
    writer = subprocess.Popen([sys.executable, "-c", HALF_WRITTEN_THEN_KILLED, kind, str(target)],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "written"
    writer.send_signal(signal.SIGKILL)
    assert writer.wait(timeout=30) == -signal.SIGKILL


def test_a_killed_file_writer_leaves_the_previous_file(tmp_path):
    target = tmp_path / "encoder.prompt.prompt.prompt"
    target.write_bytes(b"the previous prompt")
    _kill_halfway("file", target)
    assert target.read_bytes() == b"the previous prompt"


def test_a_killed_folder_writer_leaves_the_previous_folder(tmp_path):
    target = tmp_path / "checkpoint_3"
    target.mkdir()
    (target / "weights").write_bytes(b"the previous weights")
    _kill_halfway("folder", target)
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
    assert (target / "weights").read_bytes() == b"the previous weights"


def test_only_the_helper_renames_files_into_place():
    renames = re.compile(r"os\.replace\(|\.rename\(|shutil\.move\(|mkstemp\(|mkdtemp\(")
    offenders = [f"{path.relative_to(PACKAGE)}:{n}" for path in sorted(PACKAGE.rglob("*.py")) if path != HELPER
                 for n, line in enumerate(path.read_text().splitlines(), 1) if renames.search(line)]
    assert offenders == []
