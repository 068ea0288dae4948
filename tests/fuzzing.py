"""Helpers of the fuzz suite (tests/fuzz).

The stack every fuzz test attacks: target, draft, scoring and gateway as real gRPC servers on
loopback, all serving one tiny random-weight Llama imported from a synthetic GGUF through the
real loading path (fast forwards, so thousands of cases fit in seconds). `Fuzzer.expect` sends
one request (a message, or raw bytes as the serialized message) and checks the status it ends
with; `Survivor` holds state opened before any fuzzing and checks after each test that the
servers are healthy and that state is untouched.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, target_pb2, target_pb2_grpc

# Shared by every fuzz test: reproducible in CI (derandomize), no wall-clock deadline (a loaded
# CI machine is slow), no example database written into the checkout.
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# SPECMESH_FUZZ_SCALE multiplies every test's number of cases (the default run sends about
# 5,500; a longer local run: SPECMESH_FUZZ_SCALE=10).
SCALE = float(os.environ.get("SPECMESH_FUZZ_SCALE", "1"))


def examples(n: int) -> settings:
    """The shared settings with `n` cases (times SPECMESH_FUZZ_SCALE)."""
    return settings(FUZZ, max_examples=max(1, round(n * SCALE)))


C = grpc.StatusCode
# Statuses a hostile request may end with. UNKNOWN and INTERNAL (a crash) never are, nor is
# UNAVAILABLE (the server went away) or DEADLINE_EXCEEDED (it hung).
REFUSED = frozenset(
    {C.INVALID_ARGUMENT, C.NOT_FOUND, C.OUT_OF_RANGE, C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION}
)
ANY_ANSWER = REFUSED | {C.OK}
CALL_TIMEOUT_S = 30.0  # a hung server fails the case as DEADLINE_EXCEEDED instead of hanging CI
KEEPER = "fuzz-keeper"  # the session opened before the fuzzing; fuzzed ids never take this value
# The tiny model's vocabulary (tiny_gguf in tests/conftest.py: 3 specials, 256 bytes, 10 merges),
# needed while strategies are built, before the stack runs; test_fuzz_target checks it.
VOCAB = 269


@dataclass
class Stack:
    addresses: dict[str, str]  # role -> host:port
    vocab_size: int
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def channel(self, role: str) -> grpc.Channel:
        if role not in self.channels:
            self.channels[role] = grpc.insecure_channel(self.addresses[role])
        return self.channels[role]


def identity(x: bytes) -> bytes:
    return x


class Answer(NamedTuple):
    code: grpc.StatusCode
    replies: list[bytes]  # serialized reply messages (several for a stream)
    details: str


class Fuzzer:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.cases = 0
        self.codes: Counter[str] = Counter()  # "Method STATUS" -> count, printed after each test

    def call(self, role: str, method: str, request, *, streaming: bool) -> Answer:
        """Send `request` (a message, or bytes sent as the serialized message) to
        ``/<service>/<method>``; the status it ended with and the serialized replies (a stream
        is read to its end)."""
        self.cases += 1
        data = request if isinstance(request, bytes) else request.SerializeToString()
        channel = self.stack.channel(role)
        replies: list[bytes] = []
        try:
            if streaming:
                call = channel.unary_stream(method, identity, identity)
                replies.extend(call(data, timeout=CALL_TIMEOUT_S))
            else:
                replies.append(channel.unary_unary(method, identity, identity)(data, timeout=CALL_TIMEOUT_S))
        except grpc.RpcError as exc:
            return Answer(exc.code(), replies, exc.details() or "")
        return Answer(C.OK, replies, "")

    def expect(self, allowed, role: str, method: str, request, *, streaming: bool = False) -> Answer:
        """`call`, asserting that the status is one of `allowed`."""
        answer = self.call(role, method, request, streaming=streaming)
        self.codes[f"{method.rsplit('/', 1)[-1]} {answer.code.name}"] += 1
        assert answer.code in allowed, (
            f"{method} answered {answer.code.name} ({answer.details}) to {request!r:.400}"
        )
        return answer


KEEPER_PROMPT = [5, 17, 42, 99, 7, 63]
KEEPER_STEPS = 120  # greedy tokens of the reference run; each check consumes CHECK_STEPS of them
CHECK_STEPS = 1
GATEWAY_PROBE = gateway_pb2.GatewayGenerateRequest(
    prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=KEEPER_PROMPT)),
    sampling=common_pb2.SamplingParams(max_new_tokens=12, ignore_eos=True),
    policy=gateway_pb2.POLICY_SPECULATIVE,
)


def _extend(stub, session_id: str, new: list[int], length: int) -> int:
    ref = common_pb2.SessionRef(session_id=session_id, new_tokens=new, expected_length=length + len(new))
    return stub.Extend(target_pb2.ExtendRequest(session=ref), timeout=CALL_TIMEOUT_S).next_token


class Survivor:
    """State opened before the fuzzing, checked after each test: every server healthy; the
    keeper session on the target continues greedily with exactly the tokens a reference session
    produced before any fuzzing; a speculative gateway request gives the same tokens as then."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.cases = 0  # fuzz cases sent so far, by every test
        self.target = target_pb2_grpc.TargetServiceStub(stack.channel("target"))
        self.gateway = gateway_pb2_grpc.GatewayStub(stack.channel("gateway"))
        self.reference, new, length = [], KEEPER_PROMPT, 0
        for _ in range(KEEPER_STEPS):
            self.reference.append(_extend(self.target, "fuzz-reference", new, length))
            length, new = length + len(new), self.reference[-1:]
        self.target.Release(common_pb2.ReleaseRequest(session_id="fuzz-reference"))
        # the keeper holds the prompt but its last token, so the first check can Extend with it
        prefill = common_pb2.SessionRef(
            session_id=KEEPER, new_tokens=KEEPER_PROMPT[:-1], expected_length=len(KEEPER_PROMPT) - 1
        )
        self.target.Prefill(target_pb2.PrefillRequest(session=prefill))
        self.length, self.pending, self.used = len(KEEPER_PROMPT) - 1, KEEPER_PROMPT[-1:], 0
        self.gateway_tokens = list(self.gateway.Generate(GATEWAY_PROBE, timeout=CALL_TIMEOUT_S).token_ids)

    def check(self) -> None:
        for role in self.stack.addresses:
            health = health_pb2_grpc.HealthStub(self.stack.channel(role))
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, role
        assert self.used + CHECK_STEPS <= KEEPER_STEPS, (
            "raise KEEPER_STEPS: more checks than reference tokens"
        )
        for _ in range(CHECK_STEPS):
            token = _extend(self.target, KEEPER, self.pending, self.length)
            assert token == self.reference[self.used], f"keeper session diverged at step {self.used}"
            self.length, self.pending, self.used = self.length + len(self.pending), [token], self.used + 1
        assert (
            list(self.gateway.Generate(GATEWAY_PROBE, timeout=CALL_TIMEOUT_S).token_ids)
            == self.gateway_tokens
        )


# --- generators of hostile field values ----------------------------------------------------------

INT32 = st.integers(-(2**31), 2**31 - 1)
UINT64 = st.integers(0, 2**64 - 1)
# every float a float32 field can carry, NaN and the infinities included
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)
# protobuf strings hold Unicode scalar values (lone surrogates cannot be serialised); invalid
# UTF-8 on the wire is sent as raw bytes by the tests that need it
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


def token_ids(vocab: int, max_size: int = 12) -> st.SearchStrategy[list[int]]:
    """Mostly valid ids, with the boundaries (-1, vocab, int32 extremes) mixed in."""
    valid = st.integers(0, vocab - 1)
    edge = st.sampled_from([-1, vocab, vocab + 1, 2**31 - 1, -(2**31)]) | INT32
    return st.lists(valid | edge, max_size=max_size) | st.lists(valid, min_size=1, max_size=max_size)


def session_ids() -> st.SearchStrategy[str]:
    return st.sampled_from(["", "s", "fuzz-a", "x" * 300]) | TEXT.filter(lambda s: s != KEEPER)


@st.composite
def sampling(draw) -> common_pb2.SamplingParams:
    """Sampling parameters from sane to hostile (NaN temperature, negative top_k, huge counts)."""
    pb = common_pb2.SamplingParams(
        temperature=draw(st.sampled_from([0.0, 0.7, 1.0]) | FLOATS),
        top_k=draw(st.sampled_from([0, 1, 5]) | INT32),
        top_p=draw(st.sampled_from([0.0, 0.9, 1.0]) | FLOATS),
        max_new_tokens=draw(st.sampled_from([0, 1, 4, 2**31 - 1]) | st.integers(-5, 300) | INT32),
        stop=draw(st.lists(TEXT, max_size=3)),
        stop_token_ids=draw(st.lists(INT32 | st.integers(0, 300), max_size=3)),
        ignore_eos=draw(st.booleans()),
    )
    if draw(st.booleans()):
        pb.seed = draw(UINT64)
    return pb


def random_stream() -> st.SearchStrategy[common_pb2.RandomStream]:
    return st.builds(common_pb2.RandomStream, seed=UINT64, counter=UINT64)


def budgets() -> st.SearchStrategy[common_pb2.TreeBudget]:
    """Mostly budgets a draft accepts (so rounds get verified), sometimes hostile ones."""
    small = st.integers(0, 8)
    hostile = st.sampled_from([-1, 10**6, 2**31 - 1]) | INT32
    sane = st.builds(
        common_pb2.TreeBudget,
        max_nodes=small,
        max_depth=st.integers(0, 4),
        branching=st.integers(0, 3),
        num_candidates=st.integers(0, 3),
    )
    return (
        sane
        | sane
        | st.builds(
            common_pb2.TreeBudget,
            max_nodes=small | st.integers(0, 300) | hostile,
            max_depth=small | hostile,
            branching=st.integers(0, 4) | hostile,
            num_candidates=st.integers(0, 4) | hostile,
        )
        | st.builds(
            common_pb2.TreeBudget, max_nodes=small, max_depth=small, lookup_tokens=st.integers(0, 4) | hostile
        )
    )


@st.composite
def tensors(draw, vocab: int) -> common_pb2.Tensor:
    """Dense distributions: right or wrong dtype, shape and byte count; values from NaN to huge."""

    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16", "", "int32", "float64"]))
    shape = draw(
        st.sampled_from([[vocab], [vocab, 1], [], [0], [-1], [2**40]])
        | st.lists(st.integers(-3, 400), max_size=3)
    )
    n = draw(st.sampled_from([vocab, 0, 1]) | st.integers(0, 2 * vocab))
    values = draw(st.lists(FLOATS, min_size=1, max_size=4))
    with np.errstate(over="ignore", invalid="ignore"):  # huge values overflow float16: intended
        arr = np.resize(np.array(values, dtype=np.float32), n)
        if draw(st.booleans()):  # a real distribution, so some cases get past the checks
            arr = np.abs(np.nan_to_num(arr, posinf=1.0, neginf=1.0)).astype(np.float64) + 1e-3
            arr = (arr / arr.sum()).astype(np.float32)
        data = arr.astype(np.float16 if dtype == "float16" else np.float32).tobytes()
    if dtype == "bfloat16":
        data = (arr.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return common_pb2.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def distributions(draw, vocab: int, nodes: int) -> common_pb2.NodeDistribution:
    node = draw(st.integers(-1, nodes - 1) | st.sampled_from([-2, nodes, 2**31 - 1]))
    if draw(st.integers(0, 3)) == 0:
        return common_pb2.NodeDistribution(
            node=node, distribution=common_pb2.Distribution(dense=draw(tensors(vocab)))
        )
    ids = draw(st.lists(st.integers(0, vocab - 1) | st.sampled_from([-1, vocab]), max_size=6))
    probs = draw(
        st.lists(st.floats(0, 1, width=32), min_size=len(ids), max_size=len(ids))
        | st.lists(FLOATS, max_size=7)
    )
    if draw(st.booleans()) and probs and sum(probs) > 0:  # normalised, to reach the verifier
        total = sum(probs)
        probs = [p / total for p in probs]
    sparse = common_pb2.SparseDistribution(ids=ids, probs=probs)
    if draw(st.integers(0, 9)) == 0:
        return common_pb2.NodeDistribution(node=node)  # no distribution at all
    return common_pb2.NodeDistribution(node=node, distribution=common_pb2.Distribution(sparse=sparse))


@st.composite
def trees(draw, vocab: int) -> common_pb2.TokenTree:
    """Token trees: valid ones (each parent before its child), cyclic and out-of-range parents,
    mismatched lengths, NaN / negative / unnormalised draft probabilities."""
    tokens = draw(token_ids(vocab, max_size=10) | st.just([]))
    n = len(tokens)
    valid_parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    parents = draw(
        st.just(valid_parents)
        | st.lists(st.integers(-3, n + 2), min_size=n, max_size=n)  # cycles, self-loops, forward refs
        | st.lists(INT32, max_size=n + 2)  # wrong length too
    )
    tree = common_pb2.TokenTree(
        tokens=tokens,
        parents=parents,
        draft_logprobs=draw(
            st.just([]) | st.lists(FLOATS, min_size=n, max_size=n) | st.lists(FLOATS, max_size=n + 2)
        ),
        lookup_nodes=draw(st.just([]) | st.lists(st.integers(-2, n + 1), max_size=3)),
    )
    for d in draw(st.lists(distributions(vocab, max(n, 1)), max_size=4)):
        tree.expanded.append(d)
    return tree


@st.composite
def prompts(draw, vocab: int) -> common_pb2.Prompt:
    kind = draw(st.sampled_from(["text", "ids", "chat", "empty"]))
    if kind == "text":
        return common_pb2.Prompt(text=draw(TEXT))
    if kind == "ids":
        return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=draw(token_ids(vocab) | st.just([]))))
    if kind == "chat":
        roles = st.sampled_from(["user", "system", "assistant"]) | TEXT
        messages = draw(st.lists(st.builds(common_pb2.ChatMessage, role=roles, content=TEXT), max_size=3))
        return common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=messages))
    return common_pb2.Prompt()


class Sessions:
    """Fresh session ids for cases that need one, released after each case so the fuzzing never
    fills the servers' session tables (which would turn every later case into a refusal)."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.count, self.used = prefix, 0, []

    def fresh(self) -> str:
        self.count += 1
        self.used.append(f"{self.prefix}-{self.count}")
        return self.used[-1]

    def touch(self, session_id: str) -> str:
        self.used.append(session_id)
        return session_id

    def release_all(self, *stubs) -> None:
        for stub in stubs:
            for sid in self.used:
                if sid:
                    stub.Release(common_pb2.ReleaseRequest(session_id=sid), timeout=CALL_TIMEOUT_S)
        self.used.clear()
