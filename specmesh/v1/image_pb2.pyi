from specmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImagePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_POLICY_UNSPECIFIED: _ClassVar[ImagePolicy]
    IMAGE_POLICY_TARGET: _ClassVar[ImagePolicy]
    IMAGE_POLICY_SPECULATIVE: _ClassVar[ImagePolicy]
    IMAGE_POLICY_LANTERN: _ClassVar[ImagePolicy]
    IMAGE_POLICY_GSD: _ClassVar[ImagePolicy]
IMAGE_POLICY_UNSPECIFIED: ImagePolicy
IMAGE_POLICY_TARGET: ImagePolicy
IMAGE_POLICY_SPECULATIVE: ImagePolicy
IMAGE_POLICY_LANTERN: ImagePolicy
IMAGE_POLICY_GSD: ImagePolicy

class ImageGenerateRequest(_message.Message):
    __slots__ = ("class_label", "num_images", "sampling", "policy", "lantern_delta", "lantern_k", "gsd_group_size", "cfg_scale", "preview_every", "class_labels")
    CLASS_LABEL_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    LANTERN_DELTA_FIELD_NUMBER: _ClassVar[int]
    LANTERN_K_FIELD_NUMBER: _ClassVar[int]
    GSD_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    class_label: int
    num_images: int
    sampling: _common_pb2.SamplingParams
    policy: ImagePolicy
    lantern_delta: float
    lantern_k: int
    gsd_group_size: int
    cfg_scale: float
    preview_every: int
    class_labels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, class_label: _Optional[int] = ..., num_images: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., policy: _Optional[_Union[ImagePolicy, str]] = ..., lantern_delta: _Optional[float] = ..., lantern_k: _Optional[int] = ..., gsd_group_size: _Optional[int] = ..., cfg_scale: _Optional[float] = ..., preview_every: _Optional[int] = ..., class_labels: _Optional[_Iterable[int]] = ...) -> None: ...

class ImageGenerateChunk(_message.Message):
    __slots__ = ("image_index", "tokens_done", "tokens_total", "png", "final", "spec_stats", "timing")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DONE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    SPEC_STATS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    tokens_done: int
    tokens_total: int
    png: bytes
    final: bool
    spec_stats: _common_pb2.SpecStats
    timing: _common_pb2.Timing
    def __init__(self, image_index: _Optional[int] = ..., tokens_done: _Optional[int] = ..., tokens_total: _Optional[int] = ..., png: _Optional[bytes] = ..., final: _Optional[bool] = ..., spec_stats: _Optional[_Union[_common_pb2.SpecStats, _Mapping]] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ...) -> None: ...
