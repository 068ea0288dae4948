"""ImageService servicer: protobuf -> image decoding -> a stream of PNG previews, then the final
images. Model info, the engine thread and Release come from the model-servicer base; every
forward and every PNG decode runs on the engine thread, one decoding step per call, so previews
go out while the images are still being decoded."""

from __future__ import annotations

import uuid

import torch

from services.core.engine import Engine
from services.core.image_decoding import DecodeState, Lane, decode
from services.core.image_spec import cosine_distances
from services.image import convert, png
from services.image.store import ImageModels
from services.image.vq import nearest_codes
from services.runtime.model_servicer import ModelServicer
from services.runtime.worker import Clock, EngineWorker
from specmesh.v1 import common_pb2, image_pb2, image_pb2_grpc

MAX_NEIGHBOURS = 32  # largest lantern_k a request may ask for


class ImageServicer(ModelServicer, image_pb2_grpc.ImageServiceServicer):
    family = "llama-image"

    def __init__(
        self,
        target: Engine,
        draft: Engine,
        models: ImageModels,
        *,
        worker: EngineWorker | None = None,
        license: str = "",
    ) -> None:
        super().__init__(target, max_sessions=1, license=license, worker=worker)
        self.draft = draft
        self.models = models
        self.layout = models.layout
        codebook = models.vq.codebook.detach()
        self.neighbours = nearest_codes(codebook, min(MAX_NEIGHBOURS, len(codebook) - 1))  # [K, 32]
        self.cos_dist = cosine_distances(codebook)  # [K, K]
        # what a not-yet-decoded position shows in a preview: the code of an empty (black) patch
        with torch.no_grad():
            self.blank_code = int(models.vq.encode(torch.zeros(1, 1, 16, 16))[0, 0])

    def _pngs(self, lanes: list[Lane]) -> list[bytes]:
        """PNG of each lane's grid so far (blank where no code is decoded yet)."""
        n = self.layout.tokens_per_image
        ids = torch.tensor([lane.codes[:n] + [self.blank_code] * (n - len(lane.codes)) for lane in lanes])
        with torch.no_grad():
            images = self.models.vq.decode(ids)
        return [png.image_png(img) for img in images]

    async def Generate(self, request: image_pb2.ImageGenerateRequest, context):
        clock = Clock()
        cfg, classes = convert.decode_config(request, self.layout, self.neighbours, self.cos_dist)
        total = self.layout.tokens_per_image
        steps = decode(self.engine, self.draft, classes, cfg)
        # the engine thread interleaves calls without a key (their forwards batch together): a
        # close() that arrives while a cancelled step still runs would find `steps` executing
        # ("generator already executing") and leave its KV held until garbage collection
        key = f"image-{uuid.uuid4().hex}"
        previewed = [0] * len(classes)
        state: DecodeState | None = None
        try:
            while True:
                state = await self._on_engine(clock, next, steps, None, key=key)
                if state is None or state.done:
                    break
                if request.preview_every:
                    due = [
                        lane
                        for lane in state.lanes
                        if len(lane.codes) < total
                        and len(lane.codes) // request.preview_every > previewed[lane.index]
                    ]
                    if due:
                        pngs = await self._on_engine(clock, self._pngs, due, key=key)
                        for lane, data in zip(due, pngs, strict=True):
                            previewed[lane.index] = len(lane.codes) // request.preview_every
                            yield image_pb2.ImageGenerateChunk(
                                image_index=lane.index,
                                tokens_done=len(lane.codes),
                                tokens_total=total,
                                png=data,
                            )
            assert state is not None
            pngs = await self._on_engine(clock, self._pngs, state.lanes, key=key)
        finally:
            # frees every sequence's KV, also when the client cancelled the stream mid-way
            await self._on_engine(Clock(), steps.close, key=key, bounded=False)
        for lane, data in zip(state.lanes, pngs, strict=True):
            yield image_pb2.ImageGenerateChunk(
                image_index=lane.index,
                tokens_done=total,
                tokens_total=total,
                png=data,
                final=True,
                spec_stats=_stats(lane),
                timing=clock.timing(),
            )


def _stats(lane: Lane) -> common_pb2.SpecStats:
    return common_pb2.SpecStats(
        rounds=lane.forwards,
        drafted_tokens=lane.drafted,
        accepted_tokens=lane.accepted,
        mean_accepted_length=len(lane.codes) / lane.forwards if lane.forwards else 0.0,
        acceptance_rate=lane.accepted / lane.drafted if lane.drafted else 0.0,
    )
