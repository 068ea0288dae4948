"""ImageService on a tiny trained model as a real gRPC server on loopback: previews stream before
the final images, a seed fixes the images (streamed or not), bad input gets INVALID_ARGUMENT
naming the field with the server staying healthy, and a cancelled stream frees its KV."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import ServerThread

from services.image import png
from services.image.server import load_image, start_image
from services.runtime.errors import status_details
from services.runtime.settings import ServerSettings
from specmesh.v1 import common_pb2, image_pb2, image_pb2_grpc

P = image_pb2


@pytest.fixture(scope="module")
def image(tiny_image_dir):
    servicer = load_image(tiny_image_dir)
    with ServerThread(lambda: start_image(servicer, ServerSettings(host="127.0.0.1", port=0))) as srv:
        channel = grpc.insecure_channel(srv.address)
        yield servicer, image_pb2_grpc.ImageServiceStub(channel), channel
        channel.close()
    servicer.close()


def request(**kw) -> P.ImageGenerateRequest:
    base = dict(
        class_label=3,
        num_images=3,
        policy=P.IMAGE_POLICY_LANTERN,
        lantern_delta=0.2,
        sampling=common_pb2.SamplingParams(temperature=1.0, seed=11),
    )
    base.update(kw)
    return P.ImageGenerateRequest(**base)


def finals(chunks) -> dict[int, bytes]:
    return {c.image_index: c.png for c in chunks if c.final}


@pytest.mark.parametrize("policy", [P.IMAGE_POLICY_LANTERN, P.IMAGE_POLICY_GSD, P.IMAGE_POLICY_SPECULATIVE])
def test_previews_come_first_and_the_final_equals_a_non_streamed_run(image, policy) -> None:
    _, stub, _ = image
    streamed = list(stub.Generate(request(policy=policy, preview_every=16)))
    first_final = next(i for i, c in enumerate(streamed) if c.final)
    previews = streamed[:first_final]
    assert {c.image_index for c in previews} == {0, 1, 2}
    assert all(not c.final and 0 < c.tokens_done < c.tokens_total == 64 for c in previews)
    assert all(c.final for c in streamed[first_final:]) and len(streamed) - first_final == 3
    for c in previews[:1] + streamed[first_final:]:
        assert png.decode_png(c.png).shape == (16, 16)
    again = list(stub.Generate(request(policy=policy)))
    assert all(c.final for c in again) and finals(again) == finals(streamed)
    stats = streamed[-1].spec_stats
    assert stats.rounds >= 1 and 1.0 <= stats.mean_accepted_length <= 64
    other_seed = finals(
        stub.Generate(request(policy=policy, sampling=common_pb2.SamplingParams(temperature=1.0, seed=12)))
    )
    assert other_seed != finals(streamed)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(class_label=10), "class_label"),
        (dict(class_label=-1), "class_label"),
        (dict(num_images=0), "num_images"),
        (dict(num_images=65), "num_images"),
        (dict(lantern_delta=1.5), "lantern_delta"),
        (dict(lantern_delta=-0.1), "lantern_delta"),
        (dict(lantern_delta=float("nan")), "lantern_delta"),
        (dict(policy=9), "policy"),
        (dict(cfg_scale=0.5), "cfg_scale"),
        (dict(class_labels=[1, 11], num_images=0), "class_labels"),
        (dict(class_labels=[1, 2], num_images=3), "num_images"),
        (dict(sampling=common_pb2.SamplingParams(temperature=-1)), "sampling.temperature"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(image, kw, field) -> None:
    _, stub, channel = image
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(request(**kw)))
    code, _, violations = status_details(e.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and [v.field for v in violations] == [field]
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_a_batch_of_classes_gets_one_image_each_as_if_asked_alone(image) -> None:
    """Image i draws from stream (seed, i) whatever its batch holds, so a mixed batch's image of
    class 3 at index 0 equals image 0 of a request for class 3 alone (same seed)."""
    _, stub, _ = image
    mixed = finals(stub.Generate(request(class_labels=[3, 7, 0], num_images=0)))
    assert sorted(mixed) == [0, 1, 2]
    alone = finals(stub.Generate(request(class_label=3, num_images=1)))
    assert alone[0] == mixed[0]


def test_a_cancelled_stream_frees_its_kv(image) -> None:
    servicer, stub, _ = image
    free = (servicer.engine.pool.free_blocks, servicer.draft.pool.free_blocks)
    call = stub.Generate(request(policy=P.IMAGE_POLICY_SPECULATIVE, num_images=8, preview_every=1))
    first = next(call)
    assert not first.final
    call.cancel()
    deadline = time.monotonic() + 30
    while (servicer.engine.pool.free_blocks, servicer.draft.pool.free_blocks) != free:
        assert time.monotonic() < deadline, "the cancelled stream's KV blocks were not freed"
        time.sleep(0.05)
    # and the service still works
    assert len(finals(stub.Generate(request(num_images=1)))) == 1


def test_grid_png_lays_images_out_in_rows() -> None:
    images = np.linspace(0, 1, 5 * 16 * 16, dtype=np.float32).reshape(5, 1, 16, 16)
    import torch

    px = png.decode_png(png.grid_png(torch.from_numpy(images), cols=3, scale=1, pad=1))
    assert px.shape == (2 * 17 + 1, 3 * 17 + 1)
