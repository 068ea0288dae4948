"""Stop rules applied by the gateway to the tokens of each round.

Same semantics as the target's own autoregressive loop (services.core.generation): an EOS or
stop id is emitted and ends the output; a stop string ends it and is cut from the text (the
token that completed it is still reported); ``max_new_tokens`` truncates a round's tokens.
Text goes through :class:`TextReleaser`, which holds back an incomplete UTF-8 character and any
tail that may still start a stop string.
"""

from __future__ import annotations

from services.core.params import GenerationParams
from services.core.text_stream import TextReleaser
from services.core.tokenizer import Tokenizer

LENGTH = "length"
EOS = "eos"
STOP_STRING = "stop_string"


class OutputState:
    """The output of one request so far, fed a round of tokens at a time."""

    def __init__(self, tokenizer: Tokenizer, params: GenerationParams) -> None:
        self.max_new_tokens = params.max_new_tokens
        self.stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(tokenizer.eos_token_ids)
        )
        self.releaser = TextReleaser(tokenizer, tuple(params.stop_strings))
        self.tokens: list[int] = []
        self.text = ""
        self.finish: str | None = None

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    def feed(self, tokens: list[int]) -> tuple[list[int], str]:
        """Append a round's tokens in order until a stop rule fires.

        Returns the tokens kept and the text released now; sets :attr:`finish` (``"length"``,
        ``"eos"`` or ``"stop_string"``) when the output is complete. Tokens after the stop are dropped.
        """
        kept: list[int] = []
        pieces: list[str] = []
        for token in tokens:
            if self.finish is not None:
                break
            kept.append(token)
            self.tokens.append(token)
            if token in self.stop_ids:
                pieces.append(self.releaser.flush())
                self.finish = EOS
                break
            piece, stopped = self.releaser.push(token)
            pieces.append(piece)
            if stopped:
                self.finish = STOP_STRING
                break
            if len(self.tokens) >= self.max_new_tokens:
                pieces.append(self.releaser.flush())
                self.finish = LENGTH
                break
        text = "".join(pieces)
        self.text += text
        return kept, text
