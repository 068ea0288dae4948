"""Sealed KV blocks shared through Redis / Valkey: published write-behind, restored on prefill.

One value per block, under ``specmesh:kv:<hex key>`` (the block's chained sha256, see
services.core.block_keys), holding the whole block in the format of services.core.kv_format.

Choices, and why:

* **One value per block, written with one SET.** The issue's "data before metadata" rule
  exists so that a reader never finds metadata whose data is missing. A single SET is atomic
  in Redis, so a reader sees the whole value or nothing; a second metadata key would add a
  round trip per block and a window in which the two disagree (eviction takes keys one by
  one). The header inside the value is the metadata, and the reader checks it.
* **TTL on every key** (``ttl_s``, SET ... EX) and **the server bounds the size**: run it with
  ``maxmemory`` and ``maxmemory-policy allkeys-lru`` (``specmesh up``, docker-compose and the
  chart do), so the least recently used blocks go first. No accounting of our own: several
  replicas write to one server and only the server knows its memory. A block evicted from
  the middle of a prefix only shortens what later lookups find (they stop at the first miss).
* **Writes are write-behind**: the pool's ``on_seal`` hook (engine thread) copies the block
  (and narrows it to bf16 when asked) into a bounded queue and returns; a writer thread
  encodes and pipelines the SETs. When the queue is full the block is dropped and counted
  (``specmesh.kv_store.dropped``): losing a publication costs a later recompute, never a
  token's latency.
* **Reads are on the engine thread**, pipelined in chunks, and stop at the first miss: the
  prefill waits for them anyway, and the engine thread owns the pool they are copied into. So
  the client is the synchronous one (asyncio would serve only to hop back to this thread).
* **Degraded mode**: any Redis error marks the store down: logged once per outage, counted
  (``specmesh.kv_store.errors``), and neither lookups nor publications are attempted until a
  backoff (doubling up to ``max_backoff_s``) has passed; then the next operation tries again,
  and success logs that Redis is back. Services keep answering by recomputing. A host that drops
  packets (rather than refusing connections) costs a lookup at most one connect timeout
  (``timeout_s``) per backoff period.

The ``redis`` client's URL carries the password (``redis://:pw@host:6379/0``) and TLS
(``rediss://``); the client's own retries are off: the backoff above replaces them, so an
outage costs one failed attempt per backoff period, not retries on every request.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from opentelemetry import metrics

from services.core.kv_format import BlockFormatError, decode_block, encode_block
from services.runtime.settings import KV_STORAGE, KVStoreSettings, redact_url

if TYPE_CHECKING:
    from services.core.engine import Engine
    from services.core.kv import BlockPool

log = logging.getLogger("specmesh.kv_store")

KEY_PREFIX = b"specmesh:kv:"
SCOPE = "specmesh.kv_store"
ERRORS = "specmesh.kv_store.errors"
DROPPED = "specmesh.kv_store.dropped"
BLOCKS = "specmesh.kv_store.blocks"
LOOKUPS = "specmesh.kv_store.lookups"


def redis_key(key: bytes) -> bytes:
    return KEY_PREFIX + key.hex().encode()


@dataclass
class KVStoreStats:
    """Counts since start (the same events as the metrics; for benchmarks and logs)."""

    published: int = 0  # blocks written
    dropped: int = 0  # blocks not written: queue full, Redis down, or the write failed
    restored: int = 0  # blocks read and handed to a pool
    lookups: int = 0  # prefix lookups Redis answered (Redis down: none)
    hits: int = 0  # of which found at least one block
    invalid: int = 0  # values refused by the format check (treated as misses)
    errors: int = 0  # failed Redis operations
    bytes_written: int = 0
    bytes_read: int = 0


class _Backoff:
    """Up/down state shared by the engine thread (lookups) and the writer thread (publishing)."""

    def __init__(self, url: str, initial_s: float, max_s: float) -> None:
        self.url = redact_url(url)
        self.initial_s, self.max_s = initial_s, max_s
        self._lock = threading.Lock()
        self._down = False
        self._delay = 0.0
        self._retry_at = 0.0

    def available(self) -> bool:
        return not self._down or time.monotonic() >= self._retry_at

    def failed(self, operation: str, exc: Exception) -> None:
        with self._lock:
            if not self._down:  # once per outage, not once per request
                log.warning(
                    "KV store %s unreachable (%s: %s); recomputing prefixes and not publishing until "
                    "it is back",
                    self.url,
                    operation,
                    exc,
                )
            self._down = True
            self._delay = min(self.max_s, self._delay * 2 or self.initial_s)
            self._retry_at = time.monotonic() + self._delay

    def ok(self) -> None:
        if self._down:
            with self._lock:
                if self._down:
                    log.warning("KV store %s is back: publishing and lookups resume", self.url)
                self._down, self._delay = False, 0.0


class KVStore:
    """Publishes the blocks an engine seals and restores blocks for its prefills (see module doc)."""

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int = 3600,
        storage: str = "exact",
        queue_blocks: int = 256,
        read_chunk: int = 16,
        timeout_s: float = 1.0,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        meter: metrics.Meter | None = None,
    ) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if storage not in KV_STORAGE:  # exact: the pool's own dtype, bit for bit
            raise ValueError(f"KV storage must be one of {', '.join(KV_STORAGE)}, got {storage!r}")
        if ttl_s <= 0 or queue_blocks <= 0 or read_chunk <= 0:
            raise ValueError("ttl_s, queue_blocks and read_chunk must be positive")
        self.url = url
        self.ttl_s = ttl_s
        self.storage = storage
        self.read_chunk = read_chunk
        self.stats = KVStoreStats()
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self._errors_of = (redis.RedisError, OSError)
        self._backoff = _Backoff(url, initial_backoff_s, max_backoff_s)
        meter = meter or metrics.get_meter(SCOPE)
        self._m_errors = meter.create_counter(
            ERRORS, unit="{error}", description="KV-store operations that failed (Redis unreachable)"
        )
        self._m_dropped = meter.create_counter(
            DROPPED, unit="{block}", description="KV blocks not published (write queue full or Redis down)"
        )
        self._m_blocks = meter.create_counter(
            BLOCKS, unit="{block}", description="KV blocks published to / restored from Redis"
        )
        self._m_lookups = meter.create_counter(
            LOOKUPS,
            unit="{lookup}",
            description="Prefix lookups in Redis, by result: hit (at least one block restored) or miss",
        )
        # (key, k, v, computed dtype, digest); None stops the writer
        self._queue: queue.Queue[tuple | None] = queue.Queue(maxsize=queue_blocks)
        self._pool: BlockPool | None = None
        self._writer = threading.Thread(target=self._write_loop, name="kv-store-writer", daemon=True)
        self._writer.start()

    # --- wiring -------------------------------------------------------------------------------

    def attach(self, engine: Engine) -> None:
        """Publish what `engine` seals and restore its prefills' prefixes from here."""
        self._pool = engine.pool
        engine.pool.on_seal = self._on_seal
        engine.remote = self

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the writer after what is queued (up to timeout_s), then close the connections."""
        with contextlib.suppress(queue.Full):  # a writer stuck that long is a daemon thread: left behind
            self._queue.put(None, timeout=timeout_s)
        self._writer.join(timeout_s)
        self._client.close()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued block has been written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # --- publishing (engine thread -> writer thread) ------------------------------------------

    def _on_seal(self, block: int, key: bytes) -> None:
        pool = self._pool
        if pool is None or self._queue.full() or not self._backoff.available():
            self._drop(1)
            return
        # Copied now: a cached block may be evicted and overwritten before the writer runs.
        # Narrowed here too, so the writer thread does no torch arithmetic (see encode_block).
        dtype = pool.k.dtype
        stored = torch.bfloat16 if self.storage == "bfloat16" else dtype
        k = pool.k[:, block].to(stored, copy=True)  # [layers, kv_heads, block_size, head_dim]
        v = pool.v[:, block].to(stored, copy=True)
        try:
            self._queue.put_nowait((key, k, v, dtype, pool.digest))
        except queue.Full:
            self._drop(1)

    def _drop(self, n: int) -> None:
        self.stats.dropped += n
        self._m_dropped.add(n)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            items = [item]
            while item is not None and len(items) < self.read_chunk:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                items.append(item)
            blocks = [i for i in items if i is not None]
            try:
                if blocks:
                    self._publish(blocks)
            finally:
                for _ in items:
                    self._queue.task_done()
            if len(blocks) != len(items):
                return

    def _publish(self, blocks: list[tuple]) -> None:
        if not self._backoff.available():
            self._drop(len(blocks))
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            size = 0
            for key, k, v, computed, digest in blocks:
                value = encode_block(k, v, key=key, digest=digest, computed=computed)
                size += len(value)
                pipe.set(redis_key(key), value, ex=self.ttl_s)
            pipe.execute()
        except self._errors_of as exc:
            self._failed("publish", exc)
            self._drop(len(blocks))
            return
        self._backoff.ok()
        self.stats.published += len(blocks)
        self.stats.bytes_written += size
        self._m_blocks.add(len(blocks), {"operation": "publish"})

    # --- restoring (engine thread) -------------------------------------------------------------

    def fetch(self, pool: BlockPool, keys: list[bytes]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(k, v) of the longest run of `keys` in Redis, read `read_chunk` values per round trip;
        [] while Redis is down. A value that fails the format check counts as a miss."""
        found: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not keys or not self._backoff.available():
            return found
        shape, dtype = pool.block_shape, pool.k.dtype
        try:
            for start in range(0, len(keys), self.read_chunk):
                chunk = keys[start : start + self.read_chunk]
                pipe = self._client.pipeline(transaction=False)
                for key in chunk:
                    pipe.get(redis_key(key))
                for key, value in zip(chunk, pipe.execute(), strict=True):
                    if value is None:
                        break
                    try:
                        kv = decode_block(value, key=key, digest=pool.digest, shape=shape, dtype=dtype)
                    except BlockFormatError as exc:
                        self.stats.invalid += 1
                        log.debug("KV block %s refused: %s", key.hex()[:16], exc)
                        break
                    found.append(kv)
                    self.stats.bytes_read += len(value)
                if len(found) < start + len(chunk):  # stopped at a miss
                    break
        except self._errors_of as exc:
            self._failed("fetch", exc)
        else:
            self._backoff.ok()
            self.stats.lookups += 1
            self.stats.hits += bool(found)
            self._m_lookups.add(1, {"result": "hit" if found else "miss"})
        if found:
            self.stats.restored += len(found)
            self._m_blocks.add(len(found), {"operation": "restore"})
        return found

    def _failed(self, operation: str, exc: Exception) -> None:
        self.stats.errors += 1
        self._m_errors.add(1, {"operation": operation})
        self._backoff.failed(operation, exc)


def attach_kv_store(
    engine: Engine, settings: KVStoreSettings, meter: metrics.Meter | None = None
) -> KVStore | None:
    """A KVStore serving `engine`, as `settings` say; None when they name no Redis."""
    if not settings.redis_url:
        return None
    store = KVStore(
        settings.redis_url,
        ttl_s=settings.kv_ttl_seconds,
        storage=settings.kv_storage,
        queue_blocks=settings.kv_write_queue_blocks,
        meter=meter,
    )
    store.attach(engine)
    log.info(
        "KV blocks shared through %s (ttl %ds, storage %s)", redact_url(store.url), store.ttl_s, store.storage
    )
    return store
