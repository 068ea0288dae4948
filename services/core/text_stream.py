"""Streaming text release for generated tokens (torch-free: the gateway uses it too)."""

from __future__ import annotations

from services.core.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop, partial_stop_len


class TextReleaser:
    """Decides which generated text is final: trims at a stop string, and holds back an
    incomplete UTF-8 character and any tail that may still begin a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: tuple[str, ...]) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = stop_strings
        self.text = ""  # everything decoded so far
        self.released = 0  # characters of self.text already handed out

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (text to release now, whether a stop string matched)."""
        before = len(self.text)
        self.text += self.detok.feed(token)
        safe = len(self.text)
        if self.stops:
            at = find_stop(self.text, self.stops, start=before)
            if at is not None:
                out, self.released = self.text[self.released : at], at
                return out, True
            safe -= partial_stop_len(self.text, self.stops)
        out = self.text[self.released : safe]
        self.released = max(self.released, safe)
        return out, False

    def flush(self) -> str:
        self.text += self.detok.flush()
        out, self.released = self.text[self.released :], len(self.text)
        return out
