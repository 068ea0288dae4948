from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP_STRING: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class DraftStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DRAFT_STRATEGY_UNSPECIFIED: _ClassVar[DraftStrategy]
    DRAFT_STRATEGY_CHAIN: _ClassVar[DraftStrategy]
    DRAFT_STRATEGY_STATIC_TREE: _ClassVar[DraftStrategy]
    DRAFT_STRATEGY_DYNAMIC_TREE: _ClassVar[DraftStrategy]
    DRAFT_STRATEGY_MULTI_CANDIDATE: _ClassVar[DraftStrategy]
    DRAFT_STRATEGY_PROMPT_LOOKUP: _ClassVar[DraftStrategy]

class AcceptanceRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCEPTANCE_RULE_UNSPECIFIED: _ClassVar[AcceptanceRule]
    ACCEPTANCE_RULE_GREEDY: _ClassVar[AcceptanceRule]
    ACCEPTANCE_RULE_CHAIN: _ClassVar[AcceptanceRule]
    ACCEPTANCE_RULE_TREE_IID: _ClassVar[AcceptanceRule]
    ACCEPTANCE_RULE_TREE_WITHOUT_REPLACEMENT: _ClassVar[AcceptanceRule]
    ACCEPTANCE_RULE_SPECTR_KSEQ: _ClassVar[AcceptanceRule]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP_STRING: FinishReason
FINISH_REASON_CANCELLED: FinishReason
DRAFT_STRATEGY_UNSPECIFIED: DraftStrategy
DRAFT_STRATEGY_CHAIN: DraftStrategy
DRAFT_STRATEGY_STATIC_TREE: DraftStrategy
DRAFT_STRATEGY_DYNAMIC_TREE: DraftStrategy
DRAFT_STRATEGY_MULTI_CANDIDATE: DraftStrategy
DRAFT_STRATEGY_PROMPT_LOOKUP: DraftStrategy
ACCEPTANCE_RULE_UNSPECIFIED: AcceptanceRule
ACCEPTANCE_RULE_GREEDY: AcceptanceRule
ACCEPTANCE_RULE_CHAIN: AcceptanceRule
ACCEPTANCE_RULE_TREE_IID: AcceptanceRule
ACCEPTANCE_RULE_TREE_WITHOUT_REPLACEMENT: AcceptanceRule
ACCEPTANCE_RULE_SPECTR_KSEQ: AcceptanceRule

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "token_ids", "chat")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    chat: ChatMessages
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed", "max_new_tokens", "stop", "stop_token_ids", "ignore_eos")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    max_new_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class RandomStream(_message.Message):
    __slots__ = ("seed", "counter")
    SEED_FIELD_NUMBER: _ClassVar[int]
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    seed: int
    counter: int
    def __init__(self, seed: _Optional[int] = ..., counter: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "output_tokens", "cached_prompt_tokens", "seed")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    output_tokens: int
    cached_prompt_tokens: int
    seed: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ns", "forward_ns", "total_ns")
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    queue_ns: int
    forward_ns: int
    total_ns: int
    def __init__(self, queue_ns: _Optional[int] = ..., forward_ns: _Optional[int] = ..., total_ns: _Optional[int] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("session_id", "new_tokens", "expected_length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    new_tokens: _containers.RepeatedScalarFieldContainer[int]
    expected_length: int
    def __init__(self, session_id: _Optional[str] = ..., new_tokens: _Optional[_Iterable[int]] = ..., expected_length: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SparseDistribution(_message.Message):
    __slots__ = ("ids", "probs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class Distribution(_message.Message):
    __slots__ = ("sparse", "dense")
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    sparse: SparseDistribution
    dense: Tensor
    def __init__(self, sparse: _Optional[_Union[SparseDistribution, _Mapping]] = ..., dense: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class NodeDistribution(_message.Message):
    __slots__ = ("node", "distribution")
    NODE_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    node: int
    distribution: Distribution
    def __init__(self, node: _Optional[int] = ..., distribution: _Optional[_Union[Distribution, _Mapping]] = ...) -> None: ...

class TokenTree(_message.Message):
    __slots__ = ("tokens", "parents", "draft_logprobs", "expanded", "lookup_nodes")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    EXPANDED_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_NODES_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    draft_logprobs: _containers.RepeatedScalarFieldContainer[float]
    expanded: _containers.RepeatedCompositeFieldContainer[NodeDistribution]
    lookup_nodes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., draft_logprobs: _Optional[_Iterable[float]] = ..., expanded: _Optional[_Iterable[_Union[NodeDistribution, _Mapping]]] = ..., lookup_nodes: _Optional[_Iterable[int]] = ...) -> None: ...

class TreeBudget(_message.Message):
    __slots__ = ("max_nodes", "max_depth", "branching", "num_candidates", "lookup_tokens")
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    BRANCHING_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_nodes: int
    max_depth: int
    branching: int
    num_candidates: int
    lookup_tokens: int
    def __init__(self, max_nodes: _Optional[int] = ..., max_depth: _Optional[int] = ..., branching: _Optional[int] = ..., num_candidates: _Optional[int] = ..., lookup_tokens: _Optional[int] = ...) -> None: ...

class KVBudget(_message.Message):
    __slots__ = ("max_tokens", "recent_share")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RECENT_SHARE_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    recent_share: float
    def __init__(self, max_tokens: _Optional[int] = ..., recent_share: _Optional[float] = ...) -> None: ...

class SpecStats(_message.Message):
    __slots__ = ("rounds", "drafted_tokens", "accepted_tokens", "mean_accepted_length", "acceptance_rate", "routed_tokens", "verified_path_tokens", "path_acceptance_rate", "rounds_by_depth", "accepted_by_depth", "router_calls", "catch_up_tokens")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    ROUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_PATH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PATH_ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_BY_DEPTH_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_BY_DEPTH_FIELD_NUMBER: _ClassVar[int]
    ROUTER_CALLS_FIELD_NUMBER: _ClassVar[int]
    CATCH_UP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    drafted_tokens: int
    accepted_tokens: int
    mean_accepted_length: float
    acceptance_rate: float
    routed_tokens: int
    verified_path_tokens: int
    path_acceptance_rate: float
    rounds_by_depth: _containers.RepeatedScalarFieldContainer[int]
    accepted_by_depth: _containers.RepeatedScalarFieldContainer[int]
    router_calls: int
    catch_up_tokens: int
    def __init__(self, rounds: _Optional[int] = ..., drafted_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., mean_accepted_length: _Optional[float] = ..., acceptance_rate: _Optional[float] = ..., routed_tokens: _Optional[int] = ..., verified_path_tokens: _Optional[int] = ..., path_acceptance_rate: _Optional[float] = ..., rounds_by_depth: _Optional[_Iterable[int]] = ..., accepted_by_depth: _Optional[_Iterable[int]] = ..., router_calls: _Optional[int] = ..., catch_up_tokens: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "vocab_size", "max_context", "digest", "dtype", "parameters", "license", "features")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    vocab_size: int
    max_context: int
    digest: str
    dtype: str
    parameters: int
    license: str
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_context: _Optional[int] = ..., digest: _Optional[str] = ..., dtype: _Optional[str] = ..., parameters: _Optional[int] = ..., license: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
