"""Per-service session store: session id -> committed tokens + KV sequence.

Implements the wire contract's SessionRef rule: a call appends `new_tokens` and states
the length it expects afterwards; any disagreement is FAILED_PRECONDITION (the caller
resends the full prefix), so retries are idempotent and nothing is silently corrupted.

A state-changing call is a :class:`Turn`: it begins (the session is found or created), then
either commits the tokens it added or rolls back to the session as it was before the call. An
identical retry of the last state-changing call (same request bytes, see :func:`fingerprint`)
gets the remembered reply instead of being run again (:meth:`SessionStore.replay`).
"""

from __future__ import annotations

import hashlib
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
    # Next-token logits [C] and final hidden state [H] after the first `logits_at` tokens of
    # the KV cache (drafts reuse them as the root; a routed chain's router reads the hidden).
    last_logits: Any = None
    last_hidden: Any = None
    logits_at: int = -1

    @property
    def length(self) -> int:
        return len(self.tokens)

    def commit(self, tokens: list[int]) -> None:
        """Add tokens to the committed history (their KV is in `seq`, or computed lazily later)."""
        self.tokens += tokens

    def remember(self, request_fingerprint: bytes, reply: Any) -> None:
        """Keep the reply of this state-changing call for an identical retry."""
        self.last_reply = (request_fingerprint, reply)

    def replay(self, request_fingerprint: bytes) -> Any | None:
        """The remembered reply when request_fingerprint is the last state-changing call's, else None."""
        if self.last_reply and self.last_reply[0] == request_fingerprint:
            return self.last_reply[1]
        return None


def fingerprint(request: bytes) -> bytes:
    """sha256 of a request's deterministic serialisation: the key of the replay cache."""
    return hashlib.sha256(request).digest()


@dataclass
class Turn:
    """One state-changing call on a session: the session (its committed tokens as they were
    when the call began), the tokens the call appends, and whether the call created it."""

    session: Session
    new: list[int]
    created: bool

    @property
    def seq(self) -> SequenceKV:
        return self.session.seq


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

    def begin(
        self, session_id: str, new_tokens: list[int], expected_length: int, field: str = "session"
    ) -> Turn:
        """open() as one call's Turn, noting whether the call created the session."""
        self.expire_idle()  # first, so an expired session counts as created by this call
        created = session_id not in self._sessions
        return Turn(self.open(session_id, new_tokens, expected_length, field), new_tokens, created)

    def rollback(self, turn: Turn) -> None:
        """Undo a turn that did not finish: as if the call never came. A session the call created
        is released; an existing one keeps its committed tokens and drops any KV past them."""
        if turn.created:
            self.release(turn.session.session_id)
        else:
            turn.seq.truncate(turn.session.length)

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def length(self, session_id: str) -> int:
        """Committed tokens of the session; 0 for one this store does not hold."""
        session = self._sessions.get(session_id)
        return session.length if session else 0

    def replay(self, session_id: str, request_fingerprint: bytes) -> Any | None:
        """The reply to an identical retry of the session's last state-changing call, else None."""
        session = self._sessions.get(session_id)
        return session.replay(request_fingerprint) if session else None

    def release(self, session_id: str) -> bool:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        session.seq.release()
        return True
