"""`specmesh health ADDR`: the compose healthcheck of every service (docker-compose.yml)."""

from __future__ import annotations

import subprocess
import sys

from servers import ServerThread

from services.runtime.server import serve
from services.runtime.settings import ServerSettings
from specmesh.cli.main import main
from specmesh.stack import free_port

NAME = "specmesh.v1.TargetService"


def test_health_reports_serving_not_serving_and_no_answer(capsys) -> None:
    async def start():
        # a server whose health entry NAME exists; the probe needs no servicer behind it
        return await serve(lambda server: [NAME], ServerSettings(port=0, service_name="t", grace_seconds=0))

    with ServerThread(start) as thread:
        address = thread.address
        assert main(["health", address, "--service", NAME]) == 0
        assert main(["health", address]) == 0  # "" = the server as a whole
        assert "SERVING" in capsys.readouterr().out
        thread.call(thread.server.set_serving(False, [NAME]))
        assert main(["health", address, "--service", NAME]) == 1
        assert "NOT_SERVING" in capsys.readouterr().out
        assert main(["health", address, "--service", "no.such.Service"]) == 2  # NOT_FOUND
    assert main(["health", f"127.0.0.1:{free_port()}", "--timeout", "0.5"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_health_needs_no_torch() -> None:
    """It runs in the gateway image, which has no torch: with torch made unimportable the CLI
    still parses and probes (exit 2: nothing listens on that port)."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from specmesh.cli.main import main\n"
        f"sys.exit(main(['health', '127.0.0.1:{free_port()}', '--timeout', '0.5']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "ModuleNotFoundError" not in done.stderr and "ImportError" not in done.stderr
