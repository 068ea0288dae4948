"""Per-service session store: session id -> committed tokens + KV sequence.

Implements the wire contract's SessionRef rule: a call appends `new_tokens` and states
the length it expects afterwards; any disagreement is FAILED_PRECONDITION (the caller
resends the full prefix), so retries are idempotent and nothing is silently corrupted.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from services.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.core.kv import SequenceKV


@dataclass
class Session:
    session_id: str
    seq: SequenceKV
    tokens: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    # (request fingerprint, reply) of the last state-changing call, so an identical retry
    # (e.g. after a lost response) gets the same reply instead of FAILED_PRECONDITION.
    last_reply: tuple[bytes, Any] | None = None
    # Next-token logits after the last token in the KV cache (drafts reuse them as the root).
    last_logits: Any = None

    @property
    def length(self) -> int:
        return len(self.tokens)


class SessionStore:
    def __init__(self, new_sequence, *, max_sessions: int = 256, ttl_seconds: float = 600.0) -> None:
        self._new_sequence = new_sequence
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self.max_sessions = max_sessions
        self.ttl_seconds = ttl_seconds

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def expire_idle(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        stale = [sid for sid, s in self._sessions.items() if now - s.last_used > self.ttl_seconds]
        for sid in stale:
            self.release(sid)
        return len(stale)

    def open(
        self, session_id: str, new_tokens: list[int], expected_length: int, field: str = "session"
    ) -> Session:
        """Find or create the session and check that appending new_tokens gives expected_length.

        Returns the session *before* appending (the caller appends after its forward succeeds).
        """
        if not session_id:
            raise InvalidArgument("session_id is empty", f"{field}.session_id")
        self.expire_idle()
        session = self._sessions.get(session_id)
        have = session.length if session else 0
        if expected_length != have + len(new_tokens):
            raise FailedPrecondition(
                f"session {session_id!r} holds {have} tokens here; appending {len(new_tokens)} gives "
                f"{have + len(new_tokens)}, not expected_length={expected_length}. "
                "Resend the full prefix as new_tokens to a fresh session id or release it.",
                f"{field}.expected_length",
            )
        if session is None:
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(
                    f"{self.max_sessions} sessions are open; release some or raise max_sessions",
                    f"{field}.session_id",
                )
            session = Session(session_id, self._new_sequence())
            self._sessions[session_id] = session
        session.last_used = time.monotonic()
        self._sessions.move_to_end(session_id)
        return session

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def release(self, session_id: str) -> bool:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        session.seq.release()
        return True
