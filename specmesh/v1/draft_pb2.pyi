from specmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DraftPrefillRequest(_message.Message):
    __slots__ = ("model", "session")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    session: _common_pb2.SessionRef
    def __init__(self, model: _Optional[str] = ..., session: _Optional[_Union[_common_pb2.SessionRef, _Mapping]] = ...) -> None: ...

class DraftPrefillResponse(_message.Message):
    __slots__ = ("session_length", "timing")
    SESSION_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    session_length: int
    timing: _common_pb2.Timing
    def __init__(self, session_length: _Optional[int] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("model", "session", "strategy", "budget", "sampling", "random", "vocab_limit", "target_hidden_states", "route", "route_threshold")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RANDOM_FIELD_NUMBER: _ClassVar[int]
    VOCAB_LIMIT_FIELD_NUMBER: _ClassVar[int]
    TARGET_HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    model: str
    session: _common_pb2.SessionRef
    strategy: _common_pb2.DraftStrategy
    budget: _common_pb2.TreeBudget
    sampling: _common_pb2.SamplingParams
    random: _common_pb2.RandomStream
    vocab_limit: int
    target_hidden_states: _common_pb2.Tensor
    route: bool
    route_threshold: float
    def __init__(self, model: _Optional[str] = ..., session: _Optional[_Union[_common_pb2.SessionRef, _Mapping]] = ..., strategy: _Optional[_Union[_common_pb2.DraftStrategy, str]] = ..., budget: _Optional[_Union[_common_pb2.TreeBudget, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., random: _Optional[_Union[_common_pb2.RandomStream, _Mapping]] = ..., vocab_limit: _Optional[int] = ..., target_hidden_states: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., route: _Optional[bool] = ..., route_threshold: _Optional[float] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("tree", "session_length", "divergence", "timing", "rule", "route_threshold")
    TREE_FIELD_NUMBER: _ClassVar[int]
    SESSION_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DIVERGENCE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    tree: _common_pb2.TokenTree
    session_length: int
    divergence: _containers.RepeatedScalarFieldContainer[float]
    timing: _common_pb2.Timing
    rule: _common_pb2.AcceptanceRule
    route_threshold: float
    def __init__(self, tree: _Optional[_Union[_common_pb2.TokenTree, _Mapping]] = ..., session_length: _Optional[int] = ..., divergence: _Optional[_Iterable[float]] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ..., rule: _Optional[_Union[_common_pb2.AcceptanceRule, str]] = ..., route_threshold: _Optional[float] = ...) -> None: ...
