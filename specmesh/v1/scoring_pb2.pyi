from specmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DetectMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DETECT_METHOD_UNSPECIFIED: _ClassVar[DetectMethod]
    DETECT_METHOD_LOG_LIKELIHOOD: _ClassVar[DetectMethod]
    DETECT_METHOD_LOG_RANK: _ClassVar[DetectMethod]
    DETECT_METHOD_ENTROPY: _ClassVar[DetectMethod]
    DETECT_METHOD_BINOCULARS: _ClassVar[DetectMethod]
    DETECT_METHOD_FAST_DETECTGPT: _ClassVar[DetectMethod]
    DETECT_METHOD_PAWN: _ClassVar[DetectMethod]

class MembershipMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMBERSHIP_METHOD_UNSPECIFIED: _ClassVar[MembershipMethod]
    MEMBERSHIP_METHOD_MIN_K: _ClassVar[MembershipMethod]
    MEMBERSHIP_METHOD_MIN_K_PLUS_PLUS: _ClassVar[MembershipMethod]
    MEMBERSHIP_METHOD_DC_PDD: _ClassVar[MembershipMethod]

class AttributionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTRIBUTION_METHOD_UNSPECIFIED: _ClassVar[AttributionMethod]
    ATTRIBUTION_METHOD_REAGENT: _ClassVar[AttributionMethod]
    ATTRIBUTION_METHOD_GRADIENT_X_INPUT: _ClassVar[AttributionMethod]
    ATTRIBUTION_METHOD_RANDOM: _ClassVar[AttributionMethod]
DETECT_METHOD_UNSPECIFIED: DetectMethod
DETECT_METHOD_LOG_LIKELIHOOD: DetectMethod
DETECT_METHOD_LOG_RANK: DetectMethod
DETECT_METHOD_ENTROPY: DetectMethod
DETECT_METHOD_BINOCULARS: DetectMethod
DETECT_METHOD_FAST_DETECTGPT: DetectMethod
DETECT_METHOD_PAWN: DetectMethod
MEMBERSHIP_METHOD_UNSPECIFIED: MembershipMethod
MEMBERSHIP_METHOD_MIN_K: MembershipMethod
MEMBERSHIP_METHOD_MIN_K_PLUS_PLUS: MembershipMethod
MEMBERSHIP_METHOD_DC_PDD: MembershipMethod
ATTRIBUTION_METHOD_UNSPECIFIED: AttributionMethod
ATTRIBUTION_METHOD_REAGENT: AttributionMethod
ATTRIBUTION_METHOD_GRADIENT_X_INPUT: AttributionMethod
ATTRIBUTION_METHOD_RANDOM: AttributionMethod

class DetectRequest(_message.Message):
    __slots__ = ("input", "methods", "per_token")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    input: _common_pb2.Prompt
    methods: _containers.RepeatedScalarFieldContainer[DetectMethod]
    per_token: bool
    def __init__(self, input: _Optional[_Union[_common_pb2.Prompt, _Mapping]] = ..., methods: _Optional[_Iterable[_Union[DetectMethod, str]]] = ..., per_token: _Optional[bool] = ...) -> None: ...

class MethodScore(_message.Message):
    __slots__ = ("method", "score", "machine_probability", "per_token", "higher_means_machine")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MACHINE_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HIGHER_MEANS_MACHINE_FIELD_NUMBER: _ClassVar[int]
    method: DetectMethod
    score: float
    machine_probability: float
    per_token: _containers.RepeatedScalarFieldContainer[float]
    higher_means_machine: bool
    def __init__(self, method: _Optional[_Union[DetectMethod, str]] = ..., score: _Optional[float] = ..., machine_probability: _Optional[float] = ..., per_token: _Optional[_Iterable[float]] = ..., higher_means_machine: _Optional[bool] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("token_ids", "scores", "timing")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedCompositeFieldContainer[MethodScore]
    timing: _common_pb2.Timing
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[_Union[MethodScore, _Mapping]]] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ...) -> None: ...

class MembershipRequest(_message.Message):
    __slots__ = ("input", "methods", "k_fraction")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    K_FRACTION_FIELD_NUMBER: _ClassVar[int]
    input: _common_pb2.Prompt
    methods: _containers.RepeatedScalarFieldContainer[MembershipMethod]
    k_fraction: float
    def __init__(self, input: _Optional[_Union[_common_pb2.Prompt, _Mapping]] = ..., methods: _Optional[_Iterable[_Union[MembershipMethod, str]]] = ..., k_fraction: _Optional[float] = ...) -> None: ...

class MembershipScore(_message.Message):
    __slots__ = ("method", "score")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    method: MembershipMethod
    score: float
    def __init__(self, method: _Optional[_Union[MembershipMethod, str]] = ..., score: _Optional[float] = ...) -> None: ...

class MembershipResponse(_message.Message):
    __slots__ = ("scores", "timing")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[MembershipScore]
    timing: _common_pb2.Timing
    def __init__(self, scores: _Optional[_Iterable[_Union[MembershipScore, _Mapping]]] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ...) -> None: ...

class UncertaintyRequest(_message.Message):
    __slots__ = ("input", "start")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    input: _common_pb2.Prompt
    start: int
    def __init__(self, input: _Optional[_Union[_common_pb2.Prompt, _Mapping]] = ..., start: _Optional[int] = ...) -> None: ...

class UncertaintyResponse(_message.Message):
    __slots__ = ("token_ids", "entropy", "logprob", "mean_entropy", "timing", "kurtosis", "geometric_mean_prob", "arithmetic_mean_prob", "mean_kurtosis")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    MEAN_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    KURTOSIS_FIELD_NUMBER: _ClassVar[int]
    GEOMETRIC_MEAN_PROB_FIELD_NUMBER: _ClassVar[int]
    ARITHMETIC_MEAN_PROB_FIELD_NUMBER: _ClassVar[int]
    MEAN_KURTOSIS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    entropy: _containers.RepeatedScalarFieldContainer[float]
    logprob: _containers.RepeatedScalarFieldContainer[float]
    mean_entropy: float
    timing: _common_pb2.Timing
    kurtosis: _containers.RepeatedScalarFieldContainer[float]
    geometric_mean_prob: float
    arithmetic_mean_prob: float
    mean_kurtosis: float
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., entropy: _Optional[_Iterable[float]] = ..., logprob: _Optional[_Iterable[float]] = ..., mean_entropy: _Optional[float] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ..., kurtosis: _Optional[_Iterable[float]] = ..., geometric_mean_prob: _Optional[float] = ..., arithmetic_mean_prob: _Optional[float] = ..., mean_kurtosis: _Optional[float] = ...) -> None: ...

class AttributeRequest(_message.Message):
    __slots__ = ("context", "target_text", "max_new_tokens", "replace_ratio_percent", "seed", "method")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TARGET_TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_RATIO_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.Prompt
    target_text: str
    max_new_tokens: int
    replace_ratio_percent: int
    seed: int
    method: AttributionMethod
    def __init__(self, context: _Optional[_Union[_common_pb2.Prompt, _Mapping]] = ..., target_text: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., replace_ratio_percent: _Optional[int] = ..., seed: _Optional[int] = ..., method: _Optional[_Union[AttributionMethod, str]] = ...) -> None: ...

class TokenAttribution(_message.Message):
    __slots__ = ("target_index", "importance", "soft_sufficiency", "soft_comprehensiveness", "steps", "stopped")
    TARGET_INDEX_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    SOFT_SUFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    SOFT_COMPREHENSIVENESS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    target_index: int
    importance: _containers.RepeatedScalarFieldContainer[float]
    soft_sufficiency: float
    soft_comprehensiveness: float
    steps: int
    stopped: bool
    def __init__(self, target_index: _Optional[int] = ..., importance: _Optional[_Iterable[float]] = ..., soft_sufficiency: _Optional[float] = ..., soft_comprehensiveness: _Optional[float] = ..., steps: _Optional[int] = ..., stopped: _Optional[bool] = ...) -> None: ...

class AttributeResponse(_message.Message):
    __slots__ = ("context_token_ids", "target_token_ids", "attributions", "soft_sufficiency", "soft_comprehensiveness", "timing", "method", "replacement_model")
    CONTEXT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    SOFT_SUFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    SOFT_COMPREHENSIVENESS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_MODEL_FIELD_NUMBER: _ClassVar[int]
    context_token_ids: _containers.RepeatedScalarFieldContainer[int]
    target_token_ids: _containers.RepeatedScalarFieldContainer[int]
    attributions: _containers.RepeatedCompositeFieldContainer[TokenAttribution]
    soft_sufficiency: float
    soft_comprehensiveness: float
    timing: _common_pb2.Timing
    method: AttributionMethod
    replacement_model: str
    def __init__(self, context_token_ids: _Optional[_Iterable[int]] = ..., target_token_ids: _Optional[_Iterable[int]] = ..., attributions: _Optional[_Iterable[_Union[TokenAttribution, _Mapping]]] = ..., soft_sufficiency: _Optional[float] = ..., soft_comprehensiveness: _Optional[float] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ..., method: _Optional[_Union[AttributionMethod, str]] = ..., replacement_model: _Optional[str] = ...) -> None: ...
