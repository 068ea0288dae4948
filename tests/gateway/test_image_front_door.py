"""The gateway's image front door (gateway/image.py over gateway/relay.py): two real image
replicas (tiny models trained by the real recipe, `tiny_image_dir`) behind the real gateway.
A stream through the gateway, previews then final images, equals the replica's own for the same
seed; bad input keeps its status and field; a replica that is down is skipped, one that goes away
mid-stream ends that stream with its error (no restart elsewhere); a client that cancels stops
the replica's work; without replicas the calls say how to configure them. `specmesh image
generate --address` works against the gateway."""

from __future__ import annotations

import time

import grpc
import pytest
from front_doors import relayed

from services.image import png
from services.image.server import load_image, start_image
from services.runtime.errors import status_details
from specmesh.cli.main import main
from specmesh.v1 import common_pb2, image_pb2, image_pb2_grpc

P = image_pb2


def request(**kw) -> P.ImageGenerateRequest:
    base = dict(
        class_label=3,
        num_images=2,
        policy=P.IMAGE_POLICY_SPECULATIVE,
        preview_every=16,
        sampling=common_pb2.SamplingParams(temperature=1.0, seed=5),
    )
    base.update(kw)
    return P.ImageGenerateRequest(**base)


def _strip_timing(chunks: list[P.ImageGenerateChunk]) -> list[P.ImageGenerateChunk]:
    for chunk in chunks:
        chunk.ClearField("timing")
    return chunks


@pytest.fixture
def front_door(toy, tiny_image_dir):
    """A toy target (the gateway needs one), two image replicas and the gateway over them. Fresh
    servicers for each test (a hundredth of a second once torch is warm): a replica a test stops
    mid-stream keeps nothing of that stream for the next test."""
    servicers = [load_image(tiny_image_dir, threads=1) for _ in range(2)]
    with relayed(toy, "image", servicers, start_image, image_pb2_grpc.ImageServiceStub) as state:
        state["servicers"] = servicers
        yield state
    for s in servicers:
        s.close()


def test_a_stream_through_the_gateway_is_the_replicas_own(front_door) -> None:
    via, direct = front_door["via_gateway"], front_door["direct"]
    got = _strip_timing(list(via.Generate(request(), timeout=120)))
    want = _strip_timing(list(direct.Generate(request(), timeout=120)))
    assert got == want
    first_final = next(i for i, c in enumerate(got) if c.final)
    assert first_final > 0 and not any(c.final for c in got[:first_final])  # previews first
    assert sorted(c.image_index for c in got[first_final:]) == [0, 1]
    assert png.decode_png(got[-1].png).shape == (16, 16)
    pool = front_door["gateway"].app.image
    assert all(r.sessions == 0 for r in pool.replicas)


def test_bad_input_reaches_the_client_unchanged(front_door) -> None:
    for stub in (front_door["via_gateway"], front_door["direct"]):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request(class_label=10), timeout=60))
        code, _, violations = status_details(info.value)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and [v.field for v in violations] == ["class_label"]


def test_a_replica_that_is_down_is_skipped(front_door) -> None:
    via, thread = front_door["via_gateway"], front_door["thread"]
    pool = front_door["gateway"].app.image
    for replica in pool.replicas:  # the health watch would notice too; the failed call must suffice
        thread.call(_cancel(replica.watch))
    first, second = front_door["replicas"]
    thread.call(first.stop(grace=0))
    for _ in range(3):  # whichever replica each call picks, every one is answered
        chunks = list(via.Generate(request(num_images=1, preview_every=0), timeout=120))
        assert [c.final for c in chunks] == [True]
    (gone,) = [r for r in pool.replicas if r.address == first.address]
    assert not gone.available and all(r.sessions == 0 for r in pool.replicas)
    thread.call(second.stop(grace=0))
    with pytest.raises(grpc.RpcError) as info:
        list(via.Generate(request(num_images=1), timeout=60))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_replica_that_goes_away_mid_stream_ends_that_stream(front_door) -> None:
    """After chunks reached the client, another replica's run would repeat them from token 0:
    the stream ends with the error instead, and what came before it is one run."""
    via, thread = front_door["via_gateway"], front_door["thread"]
    # 64 images with a preview of each every token: seconds of work, still going when it stops
    call = via.Generate(request(num_images=64, preview_every=1, policy=P.IMAGE_POLICY_TARGET), timeout=120)
    first = next(call)
    serving = next(r for r in front_door["replicas"] if r.address in _upstream_addresses(front_door))
    thread.call(serving.stop(grace=0))
    chunks = [first]
    with pytest.raises(grpc.RpcError) as info:
        chunks.extend(call)
    assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    (gone,) = [r for r in front_door["gateway"].app.image.replicas if r.address == serving.address]
    assert not gone.available  # the next calls go to the other replica
    done: dict[int, int] = {}
    for c in chunks:  # no image starts over
        assert c.tokens_done > done.get(c.image_index, 0)
        done[c.image_index] = c.tokens_done


def test_a_client_that_cancels_stops_the_replicas_work(front_door) -> None:
    via, pool = front_door["via_gateway"], front_door["gateway"].app.image
    call = via.Generate(request(num_images=64, preview_every=1), timeout=120)
    assert not next(call).final
    call.cancel()
    _wait_idle(front_door["servicers"], pool)


def test_image_generate_works_against_the_gateway_address(front_door, tmp_path, capsys) -> None:
    args = ["image", "generate", "--class", "3", "--n", "2", "--method", "exact_sd", "--seed", "4"]
    assert main([*args, "--address", front_door["thread"].address, "--out", str(tmp_path / "a.png")]) == 0
    assert "2 images of class 3 (exact_sd)" in capsys.readouterr().err
    direct = front_door["replicas"][0].address
    assert main([*args, "--address", direct, "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_without_image_replicas_the_calls_say_how_to_configure_them(make_stack) -> None:
    stack = make_stack()
    with pytest.raises(grpc.RpcError) as info:
        list(image_pb2_grpc.ImageServiceStub(stack.channel).Generate(request(), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "--image HOST:PORT" in info.value.details()


def _wait_idle(servicers, pool, timeout_s: float = 30) -> None:
    """Until no replica holds KV (every block free) and the gateway has no call in flight."""
    deadline = time.monotonic() + timeout_s
    pools = [p for s in servicers for p in (s.engine.pool, s.draft.pool)]
    while any(p.free_blocks != p.max_blocks for p in pools) or any(r.sessions for r in pool.replicas):
        held = [p.max_blocks - p.free_blocks for p in pools], [r.sessions for r in pool.replicas]
        assert time.monotonic() < deadline, f"KV blocks held, calls in flight: {held}"
        time.sleep(0.05)


def _upstream_addresses(front_door) -> set[str]:
    """The image replicas that have a call of this gateway in flight."""
    return {r.address for r in front_door["gateway"].app.image.replicas if r.sessions}


async def _cancel(task) -> None:
    if task is not None:
        task.cancel()
