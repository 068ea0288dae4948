from specmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Policy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_UNSPECIFIED: _ClassVar[Policy]
    POLICY_TARGET: _ClassVar[Policy]
    POLICY_DRAFT: _ClassVar[Policy]
    POLICY_SPECULATIVE: _ClassVar[Policy]
    POLICY_R2R: _ClassVar[Policy]
    POLICY_AUTO: _ClassVar[Policy]

class Quality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUALITY_UNSPECIFIED: _ClassVar[Quality]
    QUALITY_EXACT: _ClassVar[Quality]
    QUALITY_HIGH: _ClassVar[Quality]
    QUALITY_FAST: _ClassVar[Quality]
POLICY_UNSPECIFIED: Policy
POLICY_TARGET: Policy
POLICY_DRAFT: Policy
POLICY_SPECULATIVE: Policy
POLICY_R2R: Policy
POLICY_AUTO: Policy
QUALITY_UNSPECIFIED: Quality
QUALITY_EXACT: Quality
QUALITY_HIGH: Quality
QUALITY_FAST: Quality

class AutoChoice(_message.Message):
    __slots__ = ("policy", "reason")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    reason: str
    def __init__(self, policy: _Optional[_Union[Policy, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class SpecOptions(_message.Message):
    __slots__ = ("strategy", "budget", "adaptive", "vocab_limit")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_LIMIT_FIELD_NUMBER: _ClassVar[int]
    strategy: _common_pb2.DraftStrategy
    budget: _common_pb2.TreeBudget
    adaptive: bool
    vocab_limit: int
    def __init__(self, strategy: _Optional[_Union[_common_pb2.DraftStrategy, str]] = ..., budget: _Optional[_Union[_common_pb2.TreeBudget, _Mapping]] = ..., adaptive: _Optional[bool] = ..., vocab_limit: _Optional[int] = ...) -> None: ...

class RouteOptions(_message.Message):
    __slots__ = ("threshold",)
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    def __init__(self, threshold: _Optional[float] = ...) -> None: ...

class GatewayGenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "sampling", "policy", "quality", "spec", "session_id", "resume_from", "route", "kv_budget")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: _common_pb2.Prompt
    sampling: _common_pb2.SamplingParams
    policy: Policy
    quality: Quality
    spec: SpecOptions
    session_id: str
    resume_from: int
    route: RouteOptions
    kv_budget: _common_pb2.KVBudget
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[_Union[_common_pb2.Prompt, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., policy: _Optional[_Union[Policy, str]] = ..., quality: _Optional[_Union[Quality, str]] = ..., spec: _Optional[_Union[SpecOptions, _Mapping]] = ..., session_id: _Optional[str] = ..., resume_from: _Optional[int] = ..., route: _Optional[_Union[RouteOptions, _Mapping]] = ..., kv_budget: _Optional[_Union[_common_pb2.KVBudget, _Mapping]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "usage", "spec_stats", "session_id", "offset", "warnings", "auto")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SPEC_STATS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    AUTO_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    spec_stats: _common_pb2.SpecStats
    session_id: str
    offset: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    auto: AutoChoice
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., spec_stats: _Optional[_Union[_common_pb2.SpecStats, _Mapping]] = ..., session_id: _Optional[str] = ..., offset: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ..., auto: _Optional[_Union[AutoChoice, _Mapping]] = ...) -> None: ...

class GatewayGenerateResponse(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "usage", "spec_stats", "session_id", "warnings", "auto")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SPEC_STATS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    AUTO_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    spec_stats: _common_pb2.SpecStats
    session_id: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    auto: AutoChoice
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., spec_stats: _Optional[_Union[_common_pb2.SpecStats, _Mapping]] = ..., session_id: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ..., auto: _Optional[_Union[AutoChoice, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ...) -> None: ...
