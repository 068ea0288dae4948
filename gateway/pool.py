"""Upstream pools: several replicas of one role (target or draft), health-watched, chosen by load.

A pool is built from address specs: ``host:port`` entries given as a comma-separated flag or
environment value. A host name that resolves to several addresses (a Kubernetes headless
service does) stands for all of them, and is re-resolved every ``resolve_every_s`` seconds so
that replicas added or removed by scaling join or leave the pool.

Each replica has its own channel and a ``grpc.health.v1`` ``Watch`` stream on the role's
service name; replicas that report SERVING (or have not answered yet) are chosen first, the
others only when no replica is available. A call that fails with UNAVAILABLE keeps its replica
out of choice for a moment at once, before the watch notices.

Choice: session affinity first (a request's later rounds go to the replica that holds its
session), else the healthy replica with the fewest sessions open through this gateway, ties
broken by the order of the addresses. A request whose replica is gone moves to another one and
re-prefills there (the policies do that; see ``gateway.policies.calls``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.errors import Unavailable

log = logging.getLogger("specmesh.gateway.pool")

RESOLVE_EVERY_S = 30.0
WATCH_RETRY_S = (0.1, 2.0)  # first and longest wait before re-opening a failed health watch
# A replica whose call failed with UNAVAILABLE is not chosen for this long even if its health
# watch (which only reports changes) still says SERVING: a refused connection or an overloaded
# server usually passes within it, and a dead one is reported NOT SERVING by then.
MARK_DOWN_S = 2.0
# How long a call waits for some replica to become available before trying one that is not
# (a replica starting up or restarting is usually back within it).
READY_WAIT_S = 5.0
# Reconnect quickly to a replica that is (re)starting: gRPC's default backoff grows to 120 s,
# and a call made during a backoff fails at once even when the server is up again.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(eq=False)
class Replica:
    """One upstream server: its address, stub, health and the sessions open on it."""

    address: str
    stub: Any
    channel: grpc.aio.Channel | None = None
    healthy: bool = True  # the health watch's view; optimistic until it answers
    down_until: float = 0.0  # time.monotonic() before which a failed call keeps it out of choice
    sessions: int = 0  # sessions this gateway holds open on it (the load measure)
    watch: asyncio.Task | None = field(default=None, repr=False)

    @property
    def available(self) -> bool:
        return self.healthy and time.monotonic() >= self.down_until


def split_addresses(spec: str | Iterable[str] | None) -> list[str]:
    """``"a:1,b:2"`` or ``["a:1", "b:2,c:3"]`` -> ``["a:1", "b:2", "c:3"]`` (order kept, no repeats)."""
    if spec is None:
        return []
    parts = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for part in parts:
        for item in part.split(","):
            item = item.strip()
            if item and item not in out:
                out.append(item)
    return out


def _host_port(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"upstream address {address!r} is not host:port")
    return host.strip("[]"), port


def resolve(address: str) -> list[str]:
    """The ``ip:port`` addresses `address` stands for; an IP literal stands for itself.

    IPv4 answers are preferred when a name has both (``localhost`` resolves to 127.0.0.1 and
    ::1, and a server bound to one of them would look half down otherwise).
    """
    host, port = _host_port(address)
    try:
        ipaddress.ip_address(host)
        return [address]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        log.warning("cannot resolve upstream %s: %s", address, exc)
        return []
    v4 = [f"{i[4][0]}:{port}" for i in infos if i[0] == socket.AF_INET]
    v6 = [f"[{i[4][0]}]:{port}" for i in infos if i[0] == socket.AF_INET6]
    return list(dict.fromkeys(v4 or v6))


class UpstreamPool:
    """The replicas of one role. Build with :meth:`connect` (real channels) or from replicas."""

    def __init__(
        self,
        role: str,
        replicas: Iterable[Replica],
        *,
        service_name: str = "",
        specs: Iterable[str] = (),
        connect: Callable[[str], tuple[grpc.aio.Channel, Any]] | None = None,
        resolve_every_s: float = RESOLVE_EVERY_S,
    ) -> None:
        self.role = role
        self.service_name = service_name  # the health entry to watch ("" = none)
        self.replicas: list[Replica] = list(replicas)
        self._specs = list(specs)
        self._connect = connect
        self._resolve_every_s = resolve_every_s
        self.moves = 0  # sessions moved to another replica because theirs was gone (failovers)
        self._resolved: dict[str, list[str]] = {}  # spec -> the addresses it last resolved to
        self._resolver: asyncio.Task | None = None

    @classmethod
    def connect(
        cls,
        role: str,
        specs: Iterable[str],
        *,
        service_name: str,
        connect: Callable[[str], tuple[grpc.aio.Channel, Any]],
        resolve_every_s: float = RESOLVE_EVERY_S,
    ) -> UpstreamPool:
        """Resolve `specs`, open a channel (``connect(address) -> (channel, stub)``) per replica
        and start watching their health. Call inside the event loop that will use the pool."""
        specs = list(specs)
        if not specs:
            raise ValueError(f"the {role} pool needs at least one host:port address")
        for spec in specs:
            _host_port(spec)  # malformed addresses fail at start-up, not at the first request
        pool = cls(
            role, [], service_name=service_name, specs=specs, connect=connect, resolve_every_s=resolve_every_s
        )
        pool._apply({spec: resolve(spec) for spec in specs})
        if resolve_every_s > 0 and not all(_is_literal(s) for s in specs):
            pool._resolver = asyncio.get_running_loop().create_task(pool._resolve_forever())
        return pool

    # -- membership --------------------------------------------------------------------------------

    def _apply(self, resolved: dict[str, list[str]]) -> None:
        """Make the replicas those `resolved` lists: add new ones, drop those no longer listed.

        A name that resolves to nothing right now keeps its last addresses (a DNS hiccup must not
        empty the pool); one that never resolved stands for itself, so requests fail with the
        channel's own error rather than "no replicas".
        """
        assert self._connect is not None
        wanted: list[str] = []
        for spec, found in resolved.items():
            found = found or self._resolved.get(spec) or [spec]
            self._resolved[spec] = found
            wanted += [a for a in found if a not in wanted]
        for replica in [r for r in self.replicas if r.address not in wanted]:
            log.info("%s replica %s left the pool", self.role, replica.address)
            self.replicas.remove(replica)
            asyncio.get_running_loop().create_task(_close(replica))
        known = {r.address for r in self.replicas}
        for address in wanted:
            if address not in known:
                channel, stub = self._connect(address)
                replica = Replica(address, stub, channel)
                self.replicas.append(replica)
                if self.service_name:
                    replica.watch = asyncio.get_running_loop().create_task(self._watch(replica))

    async def _resolve_forever(self) -> None:
        while True:
            await asyncio.sleep(self._resolve_every_s)
            try:
                resolved = {spec: await asyncio.to_thread(resolve, spec) for spec in self._specs}
                self._apply(resolved)
            except Exception:  # keep resolving; the current replicas stay
                log.exception("re-resolving the %s pool failed", self.role)

    async def _watch(self, replica: Replica) -> None:
        """Follow the replica's grpc.health.v1 status; re-open the stream when it breaks."""
        stub = health_pb2_grpc.HealthStub(replica.channel)
        wait = WATCH_RETRY_S[0]
        while True:
            try:
                call = stub.Watch(health_pb2.HealthCheckRequest(service=self.service_name))
                async for reply in call:
                    self._set_health(replica, reply.status == SERVING)
                    wait = WATCH_RETRY_S[0]
            except asyncio.CancelledError:
                raise
            except grpc.RpcError as exc:
                log.debug("health watch of %s %s: %s", self.role, replica.address, exc)
            self._set_health(replica, False)
            await asyncio.sleep(wait)
            wait = min(wait * 2, WATCH_RETRY_S[1])

    def _set_health(self, replica: Replica, healthy: bool) -> None:
        if replica.healthy != healthy:
            log.warning("%s replica %s is %s", self.role, replica.address, "up" if healthy else "down")
        replica.healthy = healthy

    def mark_down(self, replica: Replica, reason: str = "UNAVAILABLE") -> None:
        """A call to `replica` failed (UNAVAILABLE, or ran past its deadline): leave it out of
        choice for MARK_DOWN_S."""
        log.warning("%s replica %s failed a call (%s); choosing others", self.role, replica.address, reason)
        replica.down_until = time.monotonic() + MARK_DOWN_S

    # -- choice ---------------------------------------------------------------------------------

    def get(self, address: str | None) -> Replica | None:
        return next((r for r in self.replicas if r.address == address), None)

    def pick(self, prefer: str | None = None, *, avoid: Iterable[str] = ()) -> Replica:
        """The replica at `prefer` if it is available (session affinity), else the least-loaded
        available replica not in `avoid`. When none is available (all down, or none has answered
        its health watch yet, as at start-up) the least-loaded of the others not in `avoid` is
        tried anyway: a call fails fast if it really is down. UNAVAILABLE when every replica is
        in `avoid`."""
        preferred = self.get(prefer)
        if preferred is not None and preferred.available:
            return preferred
        avoided = set(avoid)
        others = [r for r in self.replicas if r.address not in avoided]
        if not others:
            tried = ", ".join(r.address for r in self.replicas) or "none configured"
            raise Unavailable(f"no {self.role} replica answers (replicas: {tried})", self.role)
        available = [r for r in others if r.available]
        return min(available or others, key=lambda r: r.sessions)  # min() keeps the first of equals

    async def choose(
        self, prefer: str | None = None, *, avoid: Iterable[str] = (), wait_s: float = READY_WAIT_S
    ) -> Replica:
        """:meth:`pick`, after waiting up to `wait_s` for a replica to become available when none
        is (the gateway started before its upstreams, or the only replica is restarting)."""
        avoided = set(avoid)
        end = time.monotonic() + wait_s
        while True:
            others = [r for r in self.replicas if r.address not in avoided]
            if not others or any(r.available for r in others) or time.monotonic() >= end:
                break
            await asyncio.sleep(0.05)
        return self.pick(prefer, avoid=avoided)

    # -- shutdown -------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
        for replica in self.replicas:
            await _close(replica)


def _is_literal(spec: str) -> bool:
    try:
        ipaddress.ip_address(_host_port(spec)[0])
        return True
    except ValueError:
        return False


async def _close(replica: Replica) -> None:
    if replica.watch is not None:
        replica.watch.cancel()
    if replica.channel is not None:
        await replica.channel.close()
