"""Dynamic batching of engine forwards across concurrent calls, on the engine thread.

Each call the engine thread runs (a Prefill, a Verify round, one Generate step, a draft
Propose with its tree levels) is a *job*: a plain function that may call ``Engine.forward``
any number of times. Every job runs in its own greenlet on the engine thread. When a job calls
``Engine.forward`` (directly or through prefill / extend / forward_tree), the engine hands the
call to :meth:`ForwardBatcher.forward`, which switches back to the scheduler with the request;
the scheduler starts or resumes the other jobs until each of them is waiting on a forward too
(or has finished), runs all waiting requests as ONE ``Engine.forward_now`` over the ragged
sequences (each keeps its positions, tree mask and logit rows), and switches back into every
job with its own slice of the logits. Sampling, verification math and session bookkeeping stay
in each job, per request, exactly as when the job runs alone.

This is continuous batching in the sense of Orca (Yu et al., OSDI 2022) and of TGI's and
vLLM's schedulers: batches form at every forward, not per request, so a stream that is one
decode step in joins a verification round and a prefill of other sessions.

When to run: at once when no other job is expected (concurrency 1 pays no window), otherwise
wait at most `window_s` for as many waiting requests as shared the previous forward (the jobs
of a steady set of streams come back from the event loop a few hundred microseconds apart).

Why greenlets and not threads: all torch work of a process belongs on one thread (see
services.runtime.worker: a second thread running torch ops costs every forward a thread
wake-up), and greenlets interleave the jobs on that thread without rewriting the engine's
callers as coroutines. Engine.forward's ``torch.inference_mode`` guard is entered inside
``forward_now`` only, on the scheduler, so no grad-mode state leaks between jobs.

Jobs with the same key (a session id) never interleave: the second starts when the first has
finished, as the calls of one session did before batching.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import greenlet

if TYPE_CHECKING:
    from services.core.engine import Engine
    from services.core.kv import SequenceKV


@dataclass
class ForwardCall:
    """One job's Engine.forward arguments, normalised so that calls can be concatenated."""

    seqs: list[SequenceKV]
    token_lists: list[list[int]]
    positions: list[list[int]] | None
    tree_masks: list[Any] | None
    logit_rows: list[list[int]] | None  # None: every row


@dataclass
class Job:
    """Work for the engine thread: fn(*args), resolved through `deliver(ok, value)`."""

    fn: Callable[..., Any]
    args: tuple
    deliver: Callable[[bool, Any], None]
    key: str | None = None
    cancelled: Callable[[], bool] = lambda: False
    submitted_ns: int = field(default_factory=time.perf_counter_ns)
    started_ns: int = 0
    engine_ns: int = 0  # time the engine thread spent on this job (its own work + its forwards)
    glet: greenlet.greenlet | None = None
    call: ForwardCall | None = None  # the forward this job waits on


class ForwardBatcher:
    """Runs jobs on the current (engine) thread and merges their forwards; see the module doc.

    window_s: longest wait for more requests before a forward; max_batch: most requests (calls,
    not sequences) in one forward; max_tokens: most new tokens in one forward (one request is
    always taken however long, so a long prefill runs alone rather than never).
    """

    def __init__(self, window_s: float = 0.002, max_batch: int = 32, max_tokens: int = 4096) -> None:
        self.window_s, self.max_batch, self.max_tokens = window_s, max_batch, max_tokens
        self.inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._engine: Engine | None = None
        self._main: greenlet.greenlet | None = None
        self._jobs: set[int] = set()  # ids of the greenlets of jobs that have started, for the hook
        self._busy_keys: set[str] = set()
        self._deferred: list[Job] = []  # jobs whose key is busy
        self._waiting: list[Job] = []  # jobs blocked on a forward
        self._expected = 1
        self.batch_sizes: list[int] = []  # requests per merged forward (tests); bounded
        self.forwards = 0
        # told each merged forward's request count, on the engine thread (the batch-size metric)
        self.on_batch: Callable[[int], None] | None = None

    def attach(self, engine: Engine) -> None:
        """Route `engine`'s forwards made inside jobs through this batcher."""
        self._engine = engine
        engine.forward_hook = self.forward

    # --- inside a job -----------------------------------------------------------------------

    def forward(
        self, seqs, token_lists, *, positions=None, tree_masks=None, logit_rows=None, last_only=False
    ):
        """Engine.forward called by a job: wait for the merged forward, return this call's part.

        Outside a job (start-up work, the scheduler itself) it runs the forward at once."""
        engine = self._engine
        assert engine is not None
        current = greenlet.getcurrent()
        if id(current) not in self._jobs:
            return engine.forward_now(
                seqs,
                token_lists,
                positions=positions,
                tree_masks=tree_masks,
                logit_rows=logit_rows,
                last_only=last_only,
            )
        if last_only:
            logit_rows = [[len(t) - 1] for t in token_lists]
        call = ForwardCall(list(seqs), [list(t) for t in token_lists], positions, tree_masks, logit_rows)
        return self._main.switch(call)  # resumed by _run_batch with (logits, hidden) or an exception

    # --- the scheduler (the engine thread's loop) ---------------------------------------------

    def run_forever(self) -> None:
        """Serve jobs from `inbox` until a None arrives (then finish what was started)."""
        self._main = greenlet.getcurrent()
        stopping = False
        while True:
            block = not self._waiting and not stopping
            try:
                job = self.inbox.get(block=block, timeout=None)
            except queue.Empty:
                job = None
                if not self._waiting:
                    return
            else:
                if job is None:
                    stopping = True
                else:
                    self._admit(job)
                self._admit_ready()
            if not self._waiting:
                if stopping:
                    return
                continue
            if not stopping:
                self._gather()
            self._run_batch()

    def _admit_ready(self) -> None:
        """Admit every job already in the inbox without waiting."""
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self.inbox.put(None)  # seen again by run_forever once the work at hand is done
                return
            self._admit(job)

    def _gather(self) -> None:
        """Wait up to window_s for as many waiting forwards as the last forward had."""
        deadline = time.perf_counter() + self.window_s
        target = min(self._expected, self.max_batch)
        while len(self._waiting) < target:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            try:
                job = self.inbox.get(timeout=left)
            except queue.Empty:
                return
            if job is None:
                self.inbox.put(None)
                return
            self._admit(job)

    def _admit(self, job: Job) -> None:
        if job.cancelled():
            job.deliver(False, _Cancelled())
            return
        if job.key is not None and job.key in self._busy_keys:
            self._deferred.append(job)
            return
        if job.key is not None:
            self._busy_keys.add(job.key)
        job.started_ns = time.perf_counter_ns()
        job.glet = greenlet.greenlet(lambda: job.fn(*job.args), parent=self._main)
        self._jobs.add(id(job.glet))
        self._step(job, job.glet.switch)

    def _step(self, job: Job, resume: Callable[..., Any], *value: Any) -> None:
        """Resume a job until it waits on a forward or finishes."""
        began = time.perf_counter_ns()
        try:
            out = resume(*value)
        except BaseException as exc:  # the job failed: its caller gets the exception
            job.engine_ns += time.perf_counter_ns() - began
            self._finish(job, False, exc)
            return
        job.engine_ns += time.perf_counter_ns() - began
        if job.glet.dead:
            self._finish(job, True, out)
        else:
            job.call = out
            self._waiting.append(job)

    def _finish(self, job: Job, ok: bool, value: Any) -> None:
        self._jobs.discard(id(job.glet))
        job.deliver(ok, value)
        if job.key is not None:
            self._busy_keys.discard(job.key)
            for i, other in enumerate(self._deferred):
                if other.key == job.key:
                    self._admit(self._deferred.pop(i))
                    break

    def _take(self) -> list[Job]:
        """The waiting jobs of the next forward: the oldest, then every other one that fits (each
        sequence at most once, max_batch, max_tokens, at most PAD_SLACK padded positions added)."""
        batch: list[Job] = []
        seen: set[int] = set()
        rows = tokens = longest = 0
        for job in list(self._waiting):
            lengths = [len(t) for t in job.call.token_lists]
            ids = {id(s) for s in job.call.seqs}
            call = (len(lengths), max(lengths, default=0), sum(lengths))
            if batch and (
                len(batch) >= self.max_batch
                or tokens + call[2] > self.max_tokens
                or ids & seen
                or _padding_added((rows, longest, tokens), call) > PAD_SLACK
            ):
                continue
            batch.append(job)
            seen |= ids
            rows, longest, tokens = rows + call[0], max(longest, call[1]), tokens + call[2]
        for job in batch:
            self._waiting.remove(job)
        return batch

    def _run_batch(self) -> None:
        batch = self._take()
        self._expected = len(batch) + len(self._waiting)
        self.forwards += 1
        self.batch_sizes = self.batch_sizes[-999:] + [len(batch)]
        if self.on_batch is not None:
            self.on_batch(len(batch))
        began = time.perf_counter_ns()
        try:
            parts = self._forward_merged([j.call for j in batch])
        except Exception:  # e.g. no room in the KV pool for all: each request alone, its own error
            parts = None
        spent = (time.perf_counter_ns() - began) // max(1, len(batch))
        for i, job in enumerate(batch):
            job.engine_ns += spent
            if parts is not None:
                self._step(job, job.glet.switch, parts[i])
                continue
            try:
                alone = self._forward_merged([job.call])[0]
            except Exception as exc:
                self._step(job, job.glet.throw, exc)
            else:
                self._step(job, job.glet.switch, alone)

    def _forward_merged(self, calls: list[ForwardCall]) -> list[tuple[list, list]]:
        """One Engine.forward_now over every call's sequences; each call's (logits, hidden)."""
        seqs = [s for c in calls for s in c.seqs]
        token_lists = [t for c in calls for t in c.token_lists]
        positions = None
        if any(c.positions is not None for c in calls):
            positions = [
                p for c in calls for p in (c.positions or [list(range(len(t))) for t in c.token_lists])
            ]
        masks = None
        if any(c.tree_masks is not None for c in calls):
            masks = [m for c in calls for m in (c.tree_masks or [None] * len(c.seqs))]
        rows = None
        if any(c.logit_rows is not None for c in calls):
            rows = [r for c in calls for r in (c.logit_rows or [list(range(len(t))) for t in c.token_lists])]
        logits, hidden = self._engine.forward_now(
            seqs, token_lists, positions=positions, tree_masks=masks, logit_rows=rows
        )
        out, start = [], 0
        for c in calls:
            end = start + len(c.seqs)
            out.append((logits[start:end], hidden[start:end]))
            start = end
        return out


# A merged forward computes rows x longest token positions (Engine.forward pads every sequence to
# the longest), and each forward has a fixed cost too: on CPU a SmolLM2 forward of 1 position
# takes about as long as 16 extra positions (27 ms vs 53 ms for 17; README, packed weights). So
# a call joins a forward when the padded positions it adds stay within that: decode steps merge
# with decode steps, trees and prefills of similar size with each other, and a decode step never
# pays for the length of a prefill or a tree.
PAD_SLACK = 16


def _padding_added(batch: tuple[int, int, int], call: tuple[int, int, int]) -> int:
    """Padded positions that merging `call` into `batch` adds; both are (sequences, longest
    length, tokens)."""
    rows, longest, useful = batch
    c_rows, c_longest, c_useful = call
    before = rows * longest - useful
    return (rows + c_rows) * max(longest, c_longest) - useful - c_useful - before


class _Cancelled(Exception):
    """The caller went away before the job started; nothing ran."""
