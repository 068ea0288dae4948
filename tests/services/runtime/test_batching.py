"""Dynamic batching on the engine thread (services.runtime.batching) on a tiny random model:
concurrent jobs share forwards, get what they would alone, fail alone, and respect keys."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from tiny_models import tiny_config

from services.core.engine import Engine
from services.core.errors import InvalidArgument, ResourceExhausted
from services.runtime.worker import RETRY_DELAY_S, Clock, EngineWorker


@pytest.fixture
def engine() -> Engine:
    return Engine.from_config(tiny_config(), block_size=4, max_kv_tokens=2048)


def decode_job(engine: Engine, prompt: list[int], steps: int):
    """Greedy decoding with a two-node tree forward in the middle: several forwards per job."""

    def run():
        seq = engine.new_sequence()
        try:
            logits = [engine.prefill(seq, prompt)]
            tokens = [int(logits[-1].argmax())]
            tree_logits, _ = engine.forward_tree(seq, [tokens[-1], 5], [-1, 0])
            seq.truncate(seq.length)  # drop the tree again
            logits.append(tree_logits)
            for _ in range(steps):
                logits.append(engine.decode(seq, tokens[-1]))
                tokens.append(int(logits[-1].argmax()))
            return tokens, logits
        finally:
            seq.release()

    return run


PROMPTS = [[1, 7, 9, 3], [4] * 11, [8, 2], list(range(10, 40)), [3, 3, 5, 6, 7], [90, 1]]


def run_all(worker: EngineWorker, jobs, keys=None):
    async def main():
        keys_ = keys or [None] * len(jobs)
        return await asyncio.gather(
            *(worker.run(Clock(), j, key=k) for j, k in zip(jobs, keys_, strict=True))
        )

    return asyncio.run(main())


def test_concurrent_jobs_share_forwards_and_match_solo(engine) -> None:
    worker = EngineWorker("tiny", window_s=0.05)
    try:
        solo = [worker.call(decode_job(engine, p, 6)) for p in PROMPTS]  # not attached: one at a time
        worker.attach(engine)
        together = run_all(worker, [decode_job(engine, p, 6) for p in PROMPTS])
    finally:
        worker.close()
    # the six jobs ran in lock-step: most forwards carried all of them
    assert max(worker.batcher.batch_sizes) == len(PROMPTS)
    assert worker.batcher.forwards < sum(1 + 1 + 6 for _ in PROMPTS) / 2
    for (tok_a, log_a), (tok_b, log_b) in zip(solo, together, strict=True):
        assert tok_a == tok_b
        for a, b in zip(log_a, log_b, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert engine.pool.free_blocks == engine.pool.max_blocks  # every job returned its blocks


def test_one_bad_forward_fails_only_its_caller(engine) -> None:
    worker = EngineWorker("tiny", window_s=0.05)
    worker.attach(engine)

    def bad():
        seq = engine.new_sequence()
        try:
            return engine.forward([seq], [[]])  # no tokens: refused by the engine
        finally:
            seq.release()

    async def main():
        return await asyncio.gather(
            worker.run(Clock(), decode_job(engine, PROMPTS[0], 3)),
            worker.run(Clock(), bad),
            return_exceptions=True,
        )

    try:
        good, err = asyncio.run(main())
        alone = worker.call(decode_job(engine, PROMPTS[0], 3))
    finally:
        worker.close()
    assert isinstance(err, InvalidArgument)
    assert good[0] == alone[0]


def test_jobs_with_one_key_never_interleave(engine) -> None:
    def job(name: str, log: list[str], until_seen: str | None = None):
        """Three forwards; with until_seen, keep forwarding until that job has logged (at most
        30 s and 1500 forwards, which the engine's 2048 KV slots hold)."""

        def run():
            seq = engine.new_sequence()
            deadline = time.monotonic() + 30.0
            i = 0
            while i < 3 or (
                until_seen and until_seen not in log and time.monotonic() < deadline and i < 1500
            ):
                log.append(name)
                engine.forward([seq], [[i % 50 + 1]])
                i += 1
            seq.release()

        return run

    worker = EngineWorker("tiny", window_s=0.05)
    worker.attach(engine)
    try:
        free: list[str] = []
        run_all(worker, [job("a", free, until_seen="b"), job("b", free)])
        keyed: list[str] = []
        run_all(worker, [job("a", keyed), job("b", keyed)], keys=["s1", "s1"])
    finally:
        worker.close()
    # the control: without a key, b runs while a is still running (a waits for it, however late
    # a busy machine lets b's greenlet join), so a's last forward comes after b's first
    last_a = len(free) - 1 - free[::-1].index("a")
    assert free.count("b") == 3 and free.index("b") < last_a
    assert keyed == ["a"] * 3 + ["b"] * 3


def test_a_full_queue_refuses_with_a_retry_hint_but_never_clean_up(engine) -> None:
    worker = EngineWorker("tiny", max_queue=2)
    worker.attach(engine)

    async def main():
        slow = [
            asyncio.ensure_future(worker.run(Clock(), decode_job(engine, PROMPTS[3], 20))) for _ in range(2)
        ]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="retry after") as refused:
            await worker.run(Clock(), decode_job(engine, PROMPTS[0], 1))
        assert refused.value.retry_delay_s == RETRY_DELAY_S
        cleaned = await worker.run(Clock(), lambda: "released", bounded=False)
        await asyncio.gather(*slow)
        return cleaned, await worker.run(Clock(), lambda: "again")

    try:
        assert asyncio.run(main()) == ("released", "again")
    finally:
        worker.close()


def test_idle_engine_runs_at_once_without_the_window(engine) -> None:
    worker = EngineWorker("tiny", window_s=5.0)  # a window that long would show in any wait
    worker.attach(engine)
    try:
        clock = Clock()
        asyncio.run(worker.run(clock, decode_job(engine, PROMPTS[0], 4)))
    finally:
        worker.close()
    assert worker.batcher.batch_sizes == [1] * 6  # prefill, tree, 4 decode steps
    # six forwards after a 5 s wait each would take 30 s: the window never applied (not a timing
    # measurement: a bound 6x below what waiting would cost)
    assert clock.timing().total_ns < 5e9


def test_merging_stops_where_padding_would_cost_more_than_a_forward() -> None:
    from services.runtime.batching import PAD_SLACK, _padding_added

    assert _padding_added((7, 1, 7), (1, 1, 1)) == 0  # an eighth decode step
    assert _padding_added((3, 40, 110), (1, 45, 45)) == 15 <= PAD_SLACK  # prefills of similar length
    assert _padding_added((1, 300, 300), (1, 1, 1)) == 299 > PAD_SLACK  # a decode step beside a prefill
    assert _padding_added((8, 1, 8), (1, 17, 17)) == 128 > PAD_SLACK  # a tree beside decode steps
