"""Where the gateway keeps request records between rounds, so that a stream can be resumed.

The gateway saves a request's :class:`~gateway.record.RequestRecord` after every round, before
it sends that round's tokens, so a saved record always covers what any client received. A
client that lost its stream sends the session id and how many tokens it got; any gateway
replica reading the same store continues from the record (``gateway.servicer``).

* :class:`MemoryStore`: this process only (one gateway replica); the default.
* :class:`RedisStore`: Redis or Valkey (``SPECMESH_REDIS_URL``; ``redis://``, ``rediss://`` for
  TLS, password in the URL), shared by every gateway replica. One JSON value per session under
  ``specmesh:session:<id>`` with a TTL. When Redis is unreachable the gateway keeps serving:
  saving fails soft (logged once per outage, counted in ``specmesh.session_store.errors``) and
  only resuming is lost until Redis answers again.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import Protocol

from services.runtime.settings import redact_url

from .record import RequestRecord

log = logging.getLogger("specmesh.gateway.sessions")

KEY_PREFIX = "specmesh:session:"
TTL_S = 600  # a record outlives its request by this long: time for a client to come back
MEMORY_MAX_RECORDS = 10_000


class SessionStore(Protocol):
    async def save(self, record: RequestRecord) -> None: ...

    async def load(self, session_id: str) -> RequestRecord | None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """Records in this process, least recently saved evicted beyond `max_records`, with a TTL."""

    def __init__(self, *, ttl_s: float = TTL_S, max_records: int = MEMORY_MAX_RECORDS) -> None:
        self.ttl_s = ttl_s
        self.max_records = max_records
        self._records: OrderedDict[str, tuple[float, str]] = OrderedDict()  # id -> (expiry, JSON)

    async def save(self, record: RequestRecord) -> None:
        # stored as JSON, as Redis stores it: a loaded record never aliases the running one
        self._records[record.session_id] = (time.monotonic() + self.ttl_s, json.dumps(record.to_dict()))
        self._records.move_to_end(record.session_id)
        while len(self._records) > self.max_records:
            self._records.popitem(last=False)

    async def load(self, session_id: str) -> RequestRecord | None:
        entry = self._records.get(session_id)
        if entry is None or entry[0] < time.monotonic():
            self._records.pop(session_id, None)
            return None
        return RequestRecord.from_dict(json.loads(entry[1]))

    async def close(self) -> None:
        self._records.clear()


class RedisStore:
    """Records in Redis / Valkey, shared by gateway replicas; fails soft while Redis is down."""

    def __init__(self, url: str, *, ttl_s: int = TTL_S, timeout_s: float = 2.0, on_error=None) -> None:
        import redis.asyncio as aioredis  # the gateway imports redis only when a URL is configured

        self.url = url
        self.ttl_s = ttl_s
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )
        self._on_error = on_error  # callable(operation) -> None: counts errors (a metric)
        self._down = False

    def _failed(self, operation: str, exc: Exception) -> None:
        if self._on_error is not None:
            self._on_error(operation)
        if not self._down:  # once per outage, not once per round
            log.warning(
                "session store %s unreachable (%s: %s); streams cannot be resumed until it is back",
                redact_url(self.url),
                operation,
                exc,
            )
            self._down = True

    def _ok(self) -> None:
        if self._down:
            log.warning("session store %s is back", redact_url(self.url))
            self._down = False

    async def save(self, record: RequestRecord) -> None:
        from redis.exceptions import RedisError

        try:
            value = json.dumps(record.to_dict())
            await self._client.set(KEY_PREFIX + record.session_id, value, ex=self.ttl_s)
        except (RedisError, OSError) as exc:
            self._failed("save", exc)
            return
        self._ok()

    async def load(self, session_id: str) -> RequestRecord | None:
        from redis.exceptions import RedisError

        from services.core.errors import Unavailable

        try:
            value = await self._client.get(KEY_PREFIX + session_id)
        except (RedisError, OSError) as exc:
            self._failed("load", exc)
            raise Unavailable(
                f"the session store is unreachable, so session {session_id} cannot be resumed now; "
                "retry, or start a new request",
                "session_id",
            ) from exc
        self._ok()
        return RequestRecord.from_dict(json.loads(value)) if value is not None else None

    async def close(self) -> None:
        await self._client.aclose()
