"""Handler re-wrapping: a yielding stream served through as_writer unwinds in its own task."""

import asyncio

import pytest

from services.runtime._handlers import as_writer


class CancellingContext:
    """Fails the n-th write with CancelledError, as grpc.aio does when the client cancels
    while a message is being sent."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.written = fail_at, []

    async def write(self, message: bytes) -> None:
        if len(self.written) == self.fail_at:
            raise asyncio.CancelledError
        self.written.append(message)


def test_as_writer_closes_the_stream_when_a_write_is_cancelled(arun) -> None:
    """The stream is suspended at its `yield` when the write fails. as_writer closes it before
    the cancellation propagates, in the same task; without that, only a garbage-collection
    finaliser would run its `finally`, later and from another task."""
    events: list[str] = []

    async def stream(request: bytes, context):
        task = asyncio.current_task()
        try:
            for i in range(5):
                yield str(i).encode()
        finally:
            events.append("closed in the rpc task" if asyncio.current_task() is task else "closed elsewhere")

    async def main():
        context = CancellingContext(fail_at=2)
        with pytest.raises(asyncio.CancelledError):
            await as_writer(stream)(b"", context)
        events.append("cancellation propagated")
        return context.written

    assert arun(main()) == [b"0", b"1"]
    assert events == ["closed in the rpc task", "cancellation propagated"]
