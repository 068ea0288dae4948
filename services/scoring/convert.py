"""Scoring-side conversions and request checks: protobuf enums and fields -> domain, naming the
field at fault."""

from __future__ import annotations

import math
from collections.abc import Iterable

from services.core.errors import FailedPrecondition, InvalidArgument, OutOfRange
from services.core.scoring.membership import DEFAULT_K_FRACTION
from services.core.tokenizer import Tokenizer
from specmesh.v1 import scoring_pb2

DETECT_NAMES = {
    scoring_pb2.DETECT_METHOD_LOG_LIKELIHOOD: "log-likelihood",
    scoring_pb2.DETECT_METHOD_LOG_RANK: "log-rank",
    scoring_pb2.DETECT_METHOD_ENTROPY: "entropy",
    scoring_pb2.DETECT_METHOD_BINOCULARS: "binoculars",
    scoring_pb2.DETECT_METHOD_FAST_DETECTGPT: "fast-detectgpt",
    scoring_pb2.DETECT_METHOD_PAWN: "pawn",
}
MEMBERSHIP_NAMES = {
    scoring_pb2.MEMBERSHIP_METHOD_MIN_K: "min-k",
    scoring_pb2.MEMBERSHIP_METHOD_MIN_K_PLUS_PLUS: "min-k++",
    scoring_pb2.MEMBERSHIP_METHOD_DC_PDD: "dc-pdd",
}
HIGHER_MEANS_MACHINE = {
    scoring_pb2.DETECT_METHOD_LOG_LIKELIHOOD: True,
    scoring_pb2.DETECT_METHOD_FAST_DETECTGPT: True,
    scoring_pb2.DETECT_METHOD_LOG_RANK: False,
    scoring_pb2.DETECT_METHOD_ENTROPY: False,
    scoring_pb2.DETECT_METHOD_BINOCULARS: False,
}


def _unique(values: Iterable[int], known: dict[int, str], field: str) -> list[int]:
    out: list[int] = []
    for v in values:
        if v not in known:
            raise InvalidArgument(f"unknown method {v}; known: {sorted(known)}", field)
        if v not in out:
            out.append(v)
    return out


def detect_methods(values: Iterable[int], has_observer: bool) -> list[int]:
    """The requested detection methods, or all available ones when none is named."""
    methods = _unique(values, DETECT_NAMES, "methods")
    if not methods:
        return [m for m in HIGHER_MEANS_MACHINE if has_observer or m != scoring_pb2.DETECT_METHOD_BINOCULARS]
    if scoring_pb2.DETECT_METHOD_PAWN in methods:
        raise FailedPrecondition("PAWN needs the learned detector, not served yet", "methods")
    if scoring_pb2.DETECT_METHOD_BINOCULARS in methods and not has_observer:
        raise FailedPrecondition(
            "BINOCULARS needs an observer model sharing the target's tokenizer; "
            "start the service with --observer (e.g. the draft model)",
            "methods",
        )
    return methods


def membership_methods(values: Iterable[int], has_reference: bool) -> list[int]:
    methods = _unique(values, MEMBERSHIP_NAMES, "methods")
    if not methods:
        return [m for m in MEMBERSHIP_NAMES if has_reference or m != scoring_pb2.MEMBERSHIP_METHOD_DC_PDD]
    if scoring_pb2.MEMBERSHIP_METHOD_DC_PDD in methods and not has_reference:
        raise FailedPrecondition(
            "DC_PDD needs a reference token-frequency table for this model's tokenizer (--reference)",
            "methods",
        )
    return methods


def k_fraction(value: float) -> float:
    if value == 0:
        return DEFAULT_K_FRACTION
    if not (math.isfinite(value) and 0 < value <= 1):
        raise InvalidArgument(
            f"must be in (0, 1] (0 = default {DEFAULT_K_FRACTION}), got {value}", "k_fraction"
        )
    return value


def uncertainty_start(start: int, n_tokens: int) -> int:
    if not 0 <= start < n_tokens:
        raise OutOfRange(f"must be in [0, {n_tokens - 1}] for {n_tokens} tokens, got {start}", "start")
    return start


def start_token_id(tokenizer: Tokenizer) -> int:
    """The token every text is conditioned on: the document separator the model was pretrained
    with where the vocabulary has one (SmolLM2's <|endoftext|>; its BOS <|im_start|> opens chat
    turns, not documents), else BOS, else the first EOS."""
    for candidate in (tokenizer.token_to_id("<|endoftext|>"), tokenizer.bos_token_id):
        if candidate is not None:
            return candidate
    if tokenizer.eos_token_ids:
        return tokenizer.eos_token_ids[0]
    raise ValueError("the tokenizer has no <|endoftext|>, BOS or EOS token to start a text with")
