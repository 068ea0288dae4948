"""The request record: all state of one gateway request, serialisable, keyed by its session id.

A policy loop keeps nothing that matters in its frame: the validated plan, the tokens emitted so
far, the round counter (it is also the counter of both counter-based random streams, so a round
replayed elsewhere draws the same numbers), the adaptive budget's state and, per upstream role,
which replica holds the request's session and what that session holds. ``to_dict`` /
``from_dict`` round-trip it through plain JSON types, which is what lets another process (a
gateway replica, through a session store) continue a request where this one stopped.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from google.protobuf import json_format

from services.core.params import KVBudget
from services.runtime.protocol import generation_params
from specmesh.v1 import common_pb2, gateway_pb2

from .budget import STRATEGY_BY_WIRE, WIRE_BY_STRATEGY, Budget, Strategy
from .requests import Plan
from .stats import SpecCounter

RECORD_VERSION = 1


def new_session_id() -> str:
    return uuid.uuid4().hex


def draft_seed(seed: int) -> int:
    """The draft's random stream seed, derived from the request seed (independent of the target's).

    Both streams are counter-based (seed, round): a round replayed on another replica draws the
    same numbers, and a sampled request is reproducible from its seed alone.
    """
    digest = hashlib.sha256(f"specmesh-draft:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class UpstreamSession:
    """One role's copy of the request's sequence: where it lives, what it holds, what it has not seen.

    `replica` is the address of the replica holding `session_id` (None: not opened anywhere
    yet); `length` tokens are committed there and `pending` are still to be sent. `opened` lists
    every (replica, session id) this request opened, for release at the end.
    """

    role: str
    pending: list[int]
    session_id: str = field(default_factory=new_session_id)
    replica: str | None = None
    length: int = 0
    opened: list[tuple[str, str]] = field(default_factory=list)

    def ref(self) -> common_pb2.SessionRef:
        return common_pb2.SessionRef(
            session_id=self.session_id,
            new_tokens=self.pending,
            expected_length=self.length + len(self.pending),
        )

    def bind(self, replica: str) -> None:
        """The session is (about to be) held by `replica`."""
        self.replica = replica
        if (replica, self.session_id) not in self.opened:
            self.opened.append((replica, self.session_id))

    def committed(self, session_length: int, pending: list[int]) -> None:
        self.length = session_length
        self.pending = list(pending)

    def restart(self, sequence: list[int]) -> None:
        """Start over under a fresh id with the whole sequence as new tokens (a re-prefill)."""
        self.session_id = new_session_id()
        self.replica = None
        self.length = 0
        self.pending = list(sequence)


@dataclass
class RequestRecord:
    """Everything a policy loop needs to run (or continue) one request."""

    session_id: str
    plan: Plan
    max_context: int
    tokens: list[int] = field(default_factory=list)  # emitted so far (after stop handling)
    rounds: int = 0  # upstream rounds done; the random streams' counter of the next round
    finish: int = common_pb2.FINISH_REASON_UNSPECIFIED
    stats: SpecCounter = field(default_factory=SpecCounter)
    adaptive: dict[str, Any] | None = None  # AdaptiveBudget.state() after the last round
    upstreams: dict[str, UpstreamSession] = field(default_factory=dict)

    @property
    def sequence(self) -> list[int]:
        """Prompt + output: what every upstream holds once its pending tokens are sent."""
        return [*self.plan.prompt_ids, *self.tokens]

    def upstream(self, role: str) -> UpstreamSession:
        """The role's session, created on first use with the prompt pending (same id as the request)."""
        if role not in self.upstreams:
            prompt = list(self.plan.prompt_ids)
            self.upstreams[role] = UpstreamSession(role, prompt, session_id=self.session_id)
        return self.upstreams[role]

    # -- serialisation --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "version": RECORD_VERSION,
            "session_id": self.session_id,
            "plan": {
                "policy": gateway_pb2.Policy.Name(plan.policy),
                "model": plan.model,
                "prompt_ids": list(plan.prompt_ids),
                "operation": plan.operation,
                "sampling": json_format.MessageToDict(plan.sampling),
                "strategy": STRATEGY_BY_WIRE[plan.strategy].value if plan.strategy else None,
                "budget": asdict(plan.budget) if plan.budget is not None else None,
                "adaptive": plan.adaptive,
                "vocab_limit": plan.vocab_limit,
                "route_threshold": plan.route_threshold,
                "quality": gateway_pb2.Quality.Name(plan.quality),
                "draft_routes": plan.draft_routes,
                "kv_budget": asdict(plan.kv_budget) if plan.kv_budget is not None else None,
            },
            "max_context": self.max_context,
            "tokens": list(self.tokens),
            "rounds": self.rounds,
            "finish": common_pb2.FinishReason.Name(self.finish),
            "stats": asdict(self.stats),
            "adaptive": self.adaptive,
            "upstreams": {role: asdict(s) for role, s in self.upstreams.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        if data.get("version") != RECORD_VERSION:
            raise ValueError(
                f"request record version {data.get('version')!r}; this gateway reads {RECORD_VERSION}"
            )
        p = data["plan"]
        sampling = json_format.ParseDict(p["sampling"], common_pb2.SamplingParams())
        plan = Plan(
            policy=gateway_pb2.Policy.Value(p["policy"]),
            model=p["model"],
            prompt_ids=tuple(p["prompt_ids"]),
            operation=p["operation"],
            params=generation_params(sampling),
            sampling=sampling,
            strategy=WIRE_BY_STRATEGY[Strategy(p["strategy"])] if p["strategy"] else 0,
            budget=Budget(**p["budget"]) if p["budget"] is not None else None,
            adaptive=p["adaptive"],
            vocab_limit=p["vocab_limit"],
            # absent from records of gateways before policies r2r and auto
            route_threshold=p.get("route_threshold"),
            quality=gateway_pb2.Quality.Value(p.get("quality", "QUALITY_UNSPECIFIED")),
            draft_routes=p.get("draft_routes", False),
            kv_budget=KVBudget(**p["kv_budget"]) if p.get("kv_budget") else None,  # absent before H2O
        )
        upstreams = {
            role: UpstreamSession(**{**s, "opened": [tuple(o) for o in s["opened"]]})
            for role, s in data["upstreams"].items()
        }
        return cls(
            session_id=data["session_id"],
            plan=plan,
            max_context=data["max_context"],
            tokens=list(data["tokens"]),
            rounds=data["rounds"],
            finish=common_pb2.FinishReason.Value(data["finish"]),
            stats=SpecCounter(**data["stats"]),
            adaptive=data["adaptive"],
            upstreams=upstreams,
        )
