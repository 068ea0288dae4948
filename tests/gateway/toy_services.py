"""Toy target and draft services for gateway tests (plain Python, no torch).

The toy vocabulary is 64 whitespace-separated words (``w2`` .. ``w63``; 0 is ``<unk>``, 1 is
``<eos>``). The target's greedy next token is a fixed function of the context; the draft's
agrees with it except at every `miss_every`-th position, so acceptance is partial and known.

Also runnable as a process (for multi-process tracing tests)::

    python tests/gateway/toy_services.py target|draft --port PORT --tokenizer DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.core.params import GenerationParams
from services.core.text_stream import TextReleaser
from services.core.tokenizer import Tokenizer
from services.runtime.protocol import generation_params
from services.runtime.server import run_forever
from services.runtime.settings import ServerSettings
from services.runtime.telemetry import setup_telemetry
from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc

V = 64
EOS = 1
MAX_CONTEXT = 256
BUSY_RETRY_DELAY_S = 0.05
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}w2{% endif %}"
)


def write_toy_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": EOS, **{f"w{i}": i for i in range(2, V)}}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(["<eos>"])
    directory.mkdir(parents=True, exist_ok=True)
    hf.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<eos>", "unk_token": "<unk>", "chat_template": TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "config.json").write_text("{}")  # enough for resolve_model() to accept the directory
    return directory


def toy_next(context: list[int]) -> int:
    """The toy target's greedy next token."""
    a = context[-1]
    b = context[-2] if len(context) > 1 else 0
    if a == V - 1:
        return EOS
    return 2 + (a * 31 + b * 17 + len(context)) % (V - 2)


def other(token: int, k: int = 1) -> int:
    """A token different from `token` (never EOS)."""
    return 2 + (token - 2 + k) % (V - 2)


# --- fake target ----------------------------------------------------------------------------


@dataclass
class FakeTarget(target_pb2_grpc.TargetServiceServicer):
    tokenizer: Tokenizer
    name: str = "toy-target"
    forget_every: int = 0  # > 0: drop every session after this many Verify calls (eviction)
    fail_verify: grpc.StatusCode | None = None
    busy_verifies: int = 0  # > 0: refuse this many Verify calls as a full queue would (RetryInfo)
    delay_s: float = 0.0  # > 0: every Verify takes this long (so a test can act between rounds)
    sessions: dict[str, list[int]] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    verifies: int = 0

    def _open(self, ref: common_pb2.SessionRef) -> list[int]:
        have = self.sessions.get(ref.session_id, [])
        if ref.expected_length != len(have) + len(ref.new_tokens):
            raise FailedPrecondition(
                f"holds {len(have)} tokens, +{len(ref.new_tokens)} != {ref.expected_length}",
                "session.expected_length",
            )
        return have + list(ref.new_tokens)

    async def GetModelInfo(self, request, context):
        return common_pb2.ModelInfo(name=self.name, family="llama", vocab_size=V, max_context=MAX_CONTEXT)

    async def Verify(self, request: target_pb2.VerifyRequest, context):
        self.calls.append(("Verify", request))
        if self.fail_verify is not None:
            await context.abort(self.fail_verify, "verify failed on purpose")
        if self.busy_verifies:
            self.busy_verifies -= 1
            raise ResourceExhausted("the engine queue is full", retry_delay_s=BUSY_RETRY_DELAY_S)
        self.verifies += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.forget_every and self.verifies % self.forget_every == 0:
            self.sessions.clear()
        seq = self._open(request.session)
        tree = request.tree
        children: dict[int, list[int]] = {}
        for i, p in enumerate(tree.parents):
            children.setdefault(p, []).append(i)
        node, nodes, tokens = -1, [], []
        while True:
            want = toy_next(seq + tokens)
            match = next((c for c in children.get(node, []) if tree.tokens[c] == want), None)
            if match is None:
                break
            node = match
            nodes.append(match)
            tokens.append(want)
        self.sessions[request.session.session_id] = seq + tokens
        return target_pb2.VerifyResponse(
            accepted_nodes=nodes,
            accepted_tokens=tokens,
            next_token=toy_next(seq + tokens),
            session_length=len(seq) + len(tokens),
        )

    async def Extend(self, request: target_pb2.ExtendRequest, context):
        self.calls.append(("Extend", request))
        seq = self._open(request.session)
        self.sessions[request.session.session_id] = seq
        return target_pb2.ExtendResponse(next_token=toy_next(seq), session_length=len(seq))

    async def Generate(self, request: target_pb2.GenerateRequest, context):
        self.calls.append(("Generate", request))
        ids = list(request.prompt.token_ids.ids)
        params: GenerationParams = generation_params(request.sampling)
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else {EOS})
        releaser = TextReleaser(self.tokenizer, params.stop_strings)
        out: list[int] = []
        for i in range(params.max_new_tokens):
            t = toy_next(ids + out)
            out.append(t)
            finish = 0
            if t in stops:
                text, finish = releaser.flush(), common_pb2.FINISH_REASON_EOS
            else:
                text, stopped = releaser.push(t)
                if stopped:
                    finish = common_pb2.FINISH_REASON_STOP_STRING
                elif i == params.max_new_tokens - 1:
                    text, finish = text + releaser.flush(), common_pb2.FINISH_REASON_LENGTH
            if finish:
                usage = common_pb2.Usage(prompt_tokens=len(ids), output_tokens=len(out), seed=params.seed)
                yield target_pb2.GenerateResponse(token_ids=[t], text=text, finish_reason=finish, usage=usage)
                return
            yield target_pb2.GenerateResponse(token_ids=[t], text=text)

    async def Release(self, request, context):
        self.released.append(request.session_id)
        return common_pb2.ReleaseResponse(released=self.sessions.pop(request.session_id, None) is not None)


# --- fake draft -----------------------------------------------------------------------------


@dataclass
class FakeDraft(draft_pb2_grpc.DraftServiceServicer):
    name: str = "toy-draft"
    miss_every: int = 4  # the draft is wrong where len(context) % miss_every == miss_every - 1 (0: never)
    empty: bool = False  # propose nothing (prompt lookup without a match)
    # route=true: the toy router knows where the draft is wrong (divergence 0.9 there, 0.1
    # elsewhere) and the chain stops at the first token above the threshold
    route_threshold: float = 0.5
    routes: bool = True  # serves routed proposals (ModelInfo.features has "route")
    logprob: float = 0.0  # the draft log-probability it reports for every proposed token
    sessions: dict[str, list[int]] = field(default_factory=dict)
    calls: list[draft_pb2.ProposeRequest] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    def next(self, context: list[int]) -> int:
        t = toy_next(context)
        if self.miss_every and len(context) % self.miss_every == self.miss_every - 1:
            return other(t)
        return t

    async def GetModelInfo(self, request, context):
        return common_pb2.ModelInfo(
            name=self.name,
            family="llama",
            vocab_size=V,
            max_context=MAX_CONTEXT,
            features=["route"] if self.routes else [],
        )

    def _chain(self, seq: list[int], first: int | None, depth: int) -> list[int]:
        out: list[int] = []
        for i in range(depth):
            out.append(first if (i == 0 and first is not None) else self.next(seq + out))
        return out

    async def Propose(self, request: draft_pb2.ProposeRequest, context):
        self.calls.append(request)
        ref, b = request.session, request.budget
        have = self.sessions.get(ref.session_id, [])
        if ref.expected_length != len(have) + len(ref.new_tokens):
            raise FailedPrecondition("length mismatch", "session.expected_length")
        if b.max_nodes < 1 or b.max_depth < 1:
            raise InvalidArgument("empty budget", "budget")
        if request.route and not self.routes:
            raise FailedPrecondition("no router loaded", "route")
        seq = have + list(ref.new_tokens)
        self.sessions[ref.session_id] = seq
        tokens: list[int] = []
        parents: list[int] = []
        depth = min(b.max_depth, b.max_nodes)
        s = request.strategy
        if self.empty:
            pass
        elif s in (common_pb2.DRAFT_STRATEGY_CHAIN, common_pb2.DRAFT_STRATEGY_PROMPT_LOOKUP):
            tokens = self._chain(seq, None, depth)
            parents = list(range(-1, len(tokens) - 1))
        elif s == common_pb2.DRAFT_STRATEGY_MULTI_CANDIDATE:
            k = max(1, b.num_candidates)
            per = max(1, min(b.max_depth, b.max_nodes // k))
            for j in range(k):
                first = self.next(seq) if j == 0 else other(self.next(seq), j)
                chain = self._chain(seq, first, per)
                base = len(tokens)
                tokens += chain
                parents += [-1] + list(range(base, base + len(chain) - 1))
        else:  # trees: at each level the draft's token first, then alternatives; follow the first
            width = max(1, b.branching)
            parent, path = -1, []
            while len(tokens) < b.max_nodes and len(path) < b.max_depth:
                best = self.next(seq + path)
                first = len(tokens)
                for j in range(width):
                    if len(tokens) >= b.max_nodes:
                        break
                    tokens.append(best if j == 0 else other(best, j))
                    parents.append(parent)
                parent = first
                path.append(best)
        divergence: list[float] = []
        threshold = request.route_threshold if request.HasField("route_threshold") else self.route_threshold
        if request.route:
            for i, token in enumerate(tokens):
                divergence.append(0.9 if token != toy_next(seq + tokens[:i]) else 0.1)
                if divergence[-1] > threshold:
                    break
            tokens, parents = tokens[: len(divergence)], parents[: len(divergence)]
        rule = common_pb2.ACCEPTANCE_RULE_GREEDY if request.sampling.temperature == 0 else 2
        return draft_pb2.ProposeResponse(
            tree=common_pb2.TokenTree(
                tokens=tokens, parents=parents, draft_logprobs=[self.logprob] * len(tokens)
            ),
            session_length=len(seq),
            rule=rule,
            divergence=divergence,
            route_threshold=threshold if request.route else 0.0,
        )

    async def Release(self, request, context):
        self.released.append(request.session_id)
        return common_pb2.ReleaseResponse(released=self.sessions.pop(request.session_id, None) is not None)


def register_target(servicer: FakeTarget):
    def register(server) -> list[str]:
        target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, server)
        return ["specmesh.v1.TargetService"]

    return register


def register_draft(servicer: FakeDraft):
    def register(server) -> list[str]:
        draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, server)
        return ["specmesh.v1.DraftService"]

    return register


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("service", choices=("target", "draft"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tokenizer", required=True)
    args = p.parse_args()
    name = f"toy-{args.service}"
    if args.service == "target":
        register = register_target(FakeTarget(Tokenizer.from_dir(args.tokenizer)))
    else:
        register = register_draft(FakeDraft())
    settings = ServerSettings(host="127.0.0.1", port=args.port, service_name=name, grace_seconds=1)
    asyncio.run(run_forever(register, settings, telemetry=setup_telemetry(name)))


if __name__ == "__main__":
    main()
