"""Scoring-side conversions and request checks: protobuf enums and fields -> domain, naming the
field at fault."""

from __future__ import annotations

import math
from collections.abc import Iterable

from services.core.errors import FailedPrecondition, InvalidArgument, OutOfRange
from services.core.scoring.attribution import (
    DEFAULT_NEW_TOKENS,
    MAX_TARGET_TOKENS,
    Attributed,
    Method,
    ReagentConfig,
)
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
ATTRIBUTION_METHODS = {
    scoring_pb2.ATTRIBUTION_METHOD_UNSPECIFIED: Method.REAGENT,
    scoring_pb2.ATTRIBUTION_METHOD_REAGENT: Method.REAGENT,
    scoring_pb2.ATTRIBUTION_METHOD_GRADIENT_X_INPUT: Method.GRADIENT_X_INPUT,
    scoring_pb2.ATTRIBUTION_METHOD_RANDOM: Method.RANDOM,
}
METHOD_VALUES = {
    Method.REAGENT: scoring_pb2.ATTRIBUTION_METHOD_REAGENT,
    Method.GRADIENT_X_INPUT: scoring_pb2.ATTRIBUTION_METHOD_GRADIENT_X_INPUT,
    Method.RANDOM: scoring_pb2.ATTRIBUTION_METHOD_RANDOM,
}
HIGHER_MEANS_MACHINE = {
    scoring_pb2.DETECT_METHOD_LOG_LIKELIHOOD: True,
    scoring_pb2.DETECT_METHOD_FAST_DETECTGPT: True,
    scoring_pb2.DETECT_METHOD_LOG_RANK: False,
    scoring_pb2.DETECT_METHOD_ENTROPY: False,
    scoring_pb2.DETECT_METHOD_BINOCULARS: False,
    scoring_pb2.DETECT_METHOD_PAWN: True,
}


def _unique(values: Iterable[int], known: dict[int, str], field: str) -> list[int]:
    out: list[int] = []
    for v in values:
        if v not in known:
            raise InvalidArgument(f"unknown method {v}; known: {sorted(known)}", field)
        if v not in out:
            out.append(v)
    return out


def detect_methods(values: Iterable[int], has_observer: bool, has_detector: bool = False) -> list[int]:
    """The requested detection methods, or all available ones when none is named."""
    methods = _unique(values, DETECT_NAMES, "methods")
    unavailable = {
        scoring_pb2.DETECT_METHOD_BINOCULARS: not has_observer,
        scoring_pb2.DETECT_METHOD_PAWN: not has_detector,
    }
    if not methods:
        return [m for m in HIGHER_MEANS_MACHINE if not unavailable.get(m, False)]
    if scoring_pb2.DETECT_METHOD_PAWN in methods and not has_detector:
        raise FailedPrecondition(
            "PAWN needs the learned detector: train it with `specmesh train detector` "
            "(it is written to <model dir>/detector/, where the service looks) or pass --detector DIR",
            "methods",
        )
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


def attribution_method(value: int) -> Method:
    if value not in ATTRIBUTION_METHODS:
        raise InvalidArgument(f"unknown method {value}; known: {sorted(ATTRIBUTION_METHODS)}", "method")
    return ATTRIBUTION_METHODS[value]


def reagent_config(replace_ratio_percent: int) -> ReagentConfig:
    """ReAGent's settings: the defaults, with the share of replaced tokens the request asks for."""
    if replace_ratio_percent == 0:
        return ReagentConfig()
    if not 1 <= replace_ratio_percent <= 100:
        raise InvalidArgument(
            f"must be in [1, 100] (0 = default {round(ReagentConfig().replace_ratio * 100)}), "
            f"got {replace_ratio_percent}",
            "replace_ratio_percent",
        )
    return ReagentConfig(replace_ratio=replace_ratio_percent / 100)


def new_tokens(max_new_tokens: int) -> int:
    """How many target tokens to generate when the request gives no target_text."""
    if max_new_tokens == 0:
        return DEFAULT_NEW_TOKENS
    if not 1 <= max_new_tokens <= MAX_TARGET_TOKENS:
        raise InvalidArgument(
            f"must be in [1, {MAX_TARGET_TOKENS}] (0 = default {DEFAULT_NEW_TOKENS}), got {max_new_tokens}",
            "max_new_tokens",
        )
    return max_new_tokens


def target_ids(target_text: str, tokenizer: Tokenizer) -> list[int] | None:
    """The tokens of target_text, or None (generate them) when it is empty."""
    if not target_text:
        return None
    ids = tokenizer.encode(target_text)
    if not 1 <= len(ids) <= MAX_TARGET_TOKENS:
        raise InvalidArgument(f"is {len(ids)} tokens; 1 to {MAX_TARGET_TOKENS} are explained", "target_text")
    return ids


def attribute_response(result: Attributed, replacement_model: str) -> scoring_pb2.AttributeResponse:
    a, f = result.attribution, result.faithfulness
    reply = scoring_pb2.AttributeResponse(
        context_token_ids=result.example.context,
        target_token_ids=result.example.target,
        method=METHOD_VALUES[result.method],
        replacement_model=replacement_model if result.method == Method.REAGENT else "",
    )
    for j, row in enumerate(a.importance.tolist()):
        reply.attributions.add(
            target_index=j,
            importance=row,
            soft_sufficiency=float(f.sufficiency[j]),
            soft_comprehensiveness=float(f.comprehensiveness[j]),
            steps=a.steps[j],
            stopped=a.stopped[j],
        )
    reply.soft_sufficiency, reply.soft_comprehensiveness = f.means()
    return reply


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
