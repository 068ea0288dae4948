"""Batching of concurrent scoring requests into shared forwards on the engine thread.

A request waits up to `window_s` for others (a few ms: small next to a forward of 100+ tokens on
CPU, and what lets concurrent callers share the weight reads of one forward), then every
waiting text, up to `max_texts` texts and `max_tokens` tokens, is scored in one
``runner.score_texts`` call. Requests that arrive while a batch runs form the next one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.core.scoring.features import TokenFeatures
from services.core.scoring.runner import Text
from services.runtime.worker import Clock

RunOnEngine = Callable[..., Awaitable[list[TokenFeatures]]]


@dataclass
class _Waiting:
    text: Text
    clock: Clock
    future: asyncio.Future[TokenFeatures]
    since: int = field(default_factory=time.perf_counter_ns)


class Batcher:
    def __init__(
        self,
        run_on_engine: RunOnEngine,
        score: Callable[[list[Text]], list[TokenFeatures]],
        *,
        window_s: float = 0.005,
        max_texts: int = 16,
        max_tokens: int = 16384,
    ) -> None:
        self._run = run_on_engine
        self._score = score
        self.window_s, self.max_texts, self.max_tokens = window_s, max_texts, max_tokens
        self._waiting: list[_Waiting] = []
        self._task: asyncio.Task[None] | None = None
        self.batch_sizes: list[int] = []  # texts per engine call, for tests and metrics

    async def score(self, text: Text, clock: Clock) -> TokenFeatures:
        future: asyncio.Future[TokenFeatures] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(text, clock, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await future

    def _take(self) -> list[_Waiting]:
        batch, tokens = [], 0
        while self._waiting and len(batch) < self.max_texts:
            n = len(self._waiting[0].text.ids)
            if batch and tokens + n > self.max_tokens:
                break  # a single text always goes, however long (it fits the context)
            batch.append(self._waiting.pop(0))
            tokens += n
        return [w for w in batch if not w.future.done()]  # a cancelled caller needs no forward

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(self.window_s)
            while self._waiting:
                batch = self._take()
                if not batch:
                    continue
                self.batch_sizes.append(len(batch))
                clock, submitted = Clock(), time.perf_counter_ns()
                try:
                    results = await self._run(clock, self._score, [w.text for w in batch])
                except Exception as exc:  # every caller of the batch sees the failure
                    for w in batch:
                        if not w.future.done():
                            w.future.set_exception(exc)
                    continue
                except BaseException:  # cancelled (shutdown): nobody waits forever
                    for w in batch + self._waiting:
                        w.future.cancel()
                    self._waiting.clear()
                    raise
                for w, r in zip(batch, results, strict=True):
                    w.clock.queue_ns += submitted - w.since + clock.queue_ns
                    w.clock.forward_ns += clock.forward_ns
                    if not w.future.done():
                        w.future.set_result(r)
        finally:
            self._task = None
