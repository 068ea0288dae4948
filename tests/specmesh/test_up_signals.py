"""`specmesh up` under the signal a closed terminal or a dropped SSH session sends: SIGHUP stops
the stack like Ctrl-C and SIGTERM (exit 0, a "stopping" line) and leaves no child running.
(SIGKILL of the parent: tests/specmesh/test_stack.py; Ctrl-C with a full stack:
tests/integration/test_stack.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specmesh import stack as supervisor

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_sighup_stops_up_and_every_child(smollm2_dir, tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "from specmesh.cli.main import main; raise SystemExit(main())"]
    argv += ["up", "--no-draft", "--port", str(supervisor.free_port()), "--target-threads", "1"]
    log = tmp_path / "up.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            # Redis is up and the target is loading: SIGHUP lands mid-start-up, the worst moment
            deadline = time.monotonic() + 120
            while len(children := _children(proc.pid)) < 2:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGHUP)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert code == 0, text
    assert "stopping" in text
    assert not [pid for pid in children if _running(pid)], text
