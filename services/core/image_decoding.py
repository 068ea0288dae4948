"""Class-conditional image-token decoding on the engine: plain AR, exact speculative decoding,
LANTERN (drafted by a small AR model) and GSD (on speculative Jacobi decoding, no draft model),
all with classifier-free guidance over a KV-cached pair of sequences per image.

Classifier-free guidance (Ho & Salimans 2207.12598, as LlamaGen 2406.06525 uses it): every
image keeps a conditional sequence [class, codes...] and, when cfg_scale != 1, an
unconditional one [null, codes...] fed the same codes; the next-code logits are
u + s (c - u) over the image codes only. Drafts guide their own pair the same way, so p and q
are both guided distributions and the acceptance rules see exactly what each side samples from.

`decode` is a generator: one step per target forward, yielding the codes so far (for
previews); closing it releases every sequence's KV blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from services.core.engine import Engine
from services.core.image_spec import GroupRule, verify_chain_grouped
from services.core.kv import SequenceKV
from services.core.params import SamplingConfig
from services.core.sampling import probabilities, round_generator
from services.core.spec import Rule, chain_parents, verify


class Method(StrEnum):
    AR = "ar"
    EXACT_SD = "exact_sd"
    LANTERN = "lantern"
    GSD = "gsd"


@dataclass(frozen=True)
class ImageDecodeConfig:
    codebook_size: int  # K: ids [0, K) are image codes
    tokens_per_image: int  # codes to generate per image (the grid)
    null_class: int  # the unconditional prefix token
    method: Method = Method.AR
    sampling: SamplingConfig = SamplingConfig(temperature=1.0)
    cfg_scale: float = 1.0
    seed: int = 0
    draft_len: int = 4  # drafted tokens per round (SD, LANTERN) or Jacobi window (GSD)
    rule: GroupRule = GroupRule("exact")  # LANTERN / GSD grouping


class _Pair:
    """One image's conditional (and unconditional) sequence on one engine, and the tokens they
    have not been fed yet."""

    def __init__(self, engine: Engine, class_token: int, null_class: int, guided: bool) -> None:
        self.cond = engine.new_sequence()
        self.uncond = engine.new_sequence() if guided else None
        self.pending_cond = [class_token]
        self.pending_uncond = [null_class]

    @property
    def seqs(self) -> list[SequenceKV]:
        return [self.cond] if self.uncond is None else [self.cond, self.uncond]

    def feeds(self, extra: list[int]) -> list[list[int]]:
        out = [self.pending_cond + extra]
        if self.uncond is not None:
            out.append(self.pending_uncond + extra)
        return out

    def keep(self, length: int, pending: list[int]) -> None:
        """Keep the first `length` fed tokens of each sequence; `pending` is fed next time."""
        for s in self.seqs:
            s.truncate(length)
        self.pending_cond = list(pending)
        self.pending_uncond = list(pending)

    def release(self) -> None:
        for s in self.seqs:
            s.release()


def _guided_forward(
    engine: Engine, pairs: list[_Pair], extras: list[list[int]], rows: list[int], cfg: ImageDecodeConfig
) -> list[torch.Tensor]:
    """Feed each pair its pending tokens + extras[i] in one batched forward; return, per pair,
    the guided distributions [rows[i], K] at its last rows[i] positions."""
    seqs, tokens, logit_rows = [], [], []
    for pair, extra, n in zip(pairs, extras, rows, strict=True):
        for s, feed in zip(pair.seqs, pair.feeds(extra), strict=True):
            seqs.append(s)
            tokens.append(feed)
            logit_rows.append(list(range(len(feed) - n, len(feed))))
    logits = engine.forward(seqs, tokens, logit_rows=logit_rows)[0]  # per sequence [n, V]
    out, i = [], 0
    for pair in pairs:
        cond = logits[i][:, : cfg.codebook_size].float()
        i += 1
        if pair.uncond is not None:
            uncond = logits[i][:, : cfg.codebook_size].float()
            i += 1
            cond = uncond + cfg.cfg_scale * (cond - uncond)
        out.append(probabilities(cond, cfg.sampling).double())
    return out


@dataclass
class Lane:
    """One image being decoded."""

    index: int
    target: _Pair
    draft: _Pair | None
    generator: torch.Generator
    codes: list[int] = field(default_factory=list)
    forwards: int = 0  # target forwards that emitted tokens for this image
    drafted: int = 0
    accepted: int = 0
    window: list[int] = field(default_factory=list)  # GSD: Jacobi draft tokens
    window_q: list[torch.Tensor] = field(default_factory=list)  # GSD: their distributions [K]


@dataclass
class DecodeState:
    lanes: list[Lane]
    done: bool = False

    def stats(self) -> dict[str, float]:
        forwards = sum(lane.forwards for lane in self.lanes)
        drafted = sum(lane.drafted for lane in self.lanes)
        accepted = sum(lane.accepted for lane in self.lanes)
        emitted = sum(len(lane.codes) for lane in self.lanes)
        return {
            "rounds": forwards,
            "drafted_tokens": drafted,
            "accepted_tokens": accepted,
            "mean_accepted_length": emitted / forwards if forwards else 0.0,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
        }


def _sample(probs: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(probs.float(), 1, generator=gen))


def decode(
    target: Engine, draft: Engine | None, class_tokens: list[int], cfg: ImageDecodeConfig
) -> Iterator[DecodeState]:
    """Decode one image per class token; yields the state after every target forward (the last
    yield has done=True). Image i draws from its own stream (cfg.seed, i), so a seed fixes the
    images whatever the consumer does between steps."""
    guided = cfg.cfg_scale != 1.0
    needs_draft = cfg.method in (Method.EXACT_SD, Method.LANTERN)
    if needs_draft and draft is None:
        raise ValueError(f"method {cfg.method.value} needs a draft model")
    lanes = [
        Lane(
            i,
            _Pair(target, c, cfg.null_class, guided),
            _Pair(draft, c, cfg.null_class, guided) if needs_draft and draft is not None else None,
            round_generator(cfg.seed, i, "image"),
        )
        for i, c in enumerate(class_tokens)
    ]
    state = DecodeState(lanes)
    try:
        while True:
            live = [lane for lane in lanes if len(lane.codes) < cfg.tokens_per_image]
            if not live:
                break
            if cfg.method is Method.AR:
                _ar_step(target, live, cfg)
            elif cfg.method is Method.GSD:
                _jacobi_step(target, live, cfg)
            else:
                assert draft is not None
                _speculative_step(target, draft, live, cfg)
            state.done = all(len(lane.codes) >= cfg.tokens_per_image for lane in lanes)
            yield state
    finally:
        for lane in lanes:
            lane.target.release()
            if lane.draft is not None:
                lane.draft.release()


def _ar_step(target: Engine, lanes: list[Lane], cfg: ImageDecodeConfig) -> None:
    probs = _guided_forward(
        target, [lane.target for lane in lanes], [[] for _ in lanes], [1] * len(lanes), cfg
    )
    for lane, p in zip(lanes, probs, strict=True):
        x = _sample(p[0], lane.generator)
        lane.codes.append(x)
        lane.forwards += 1
        lane.target.pending_cond = [x]
        lane.target.pending_uncond = [x]


def _speculative_step(target: Engine, draft: Engine, lanes: list[Lane], cfg: ImageDecodeConfig) -> None:
    """One round per lane: the draft proposes g tokens (one batched draft forward per depth),
    the target scores them in one forward, the rule accepts a prefix and emits one more."""
    # g drafted tokens, leaving room for the corrected / bonus token
    g = {lane.index: min(cfg.draft_len, cfg.tokens_per_image - len(lane.codes) - 1) for lane in lanes}
    drafted: dict[int, list[int]] = {lane.index: [] for lane in lanes}
    qs: dict[int, list[torch.Tensor]] = {lane.index: [] for lane in lanes}
    draft_base = {lane.index: lane.draft.cond.length for lane in lanes if lane.draft is not None}
    draft_pending = {lane.index: list(lane.draft.pending_cond) for lane in lanes if lane.draft is not None}
    for depth in range(max(g.values())):
        active = [lane for lane in lanes if g[lane.index] > depth]
        pairs = [lane.draft for lane in active]
        probs = _guided_forward(draft, pairs, [[] for _ in active], [1] * len(active), cfg)
        for lane, q in zip(active, probs, strict=True):
            d = _sample(q[0], lane.generator)
            drafted[lane.index].append(d)
            qs[lane.index].append(q[0])
            lane.draft.pending_cond = [d]
            lane.draft.pending_uncond = [d]
    target_base = {lane.index: lane.target.cond.length for lane in lanes}
    target_pending = {lane.index: len(lane.target.pending_cond) for lane in lanes}
    probs = _guided_forward(
        target,
        [lane.target for lane in lanes],
        [drafted[lane.index] for lane in lanes],
        [g[lane.index] + 1 for lane in lanes],
        cfg,
    )
    for lane, p in zip(lanes, probs, strict=True):
        i, d = lane.index, drafted[lane.index]
        if cfg.method is Method.EXACT_SD:
            q = {j - 1: qj for j, qj in enumerate(qs[i])}
            result = verify(Rule.CHAIN, d, chain_parents(len(d)), p, q, lane.generator)
        else:
            q_rows = torch.stack(qs[i]) if d else p[:0]
            result = verify_chain_grouped(cfg.rule, d, p, q_rows, lane.generator)
        a = len(result.path)
        lane.codes += d[:a] + [result.next_token]
        lane.forwards += 1
        lane.drafted += len(d)
        lane.accepted += a
        lane.target.keep(target_base[i] + target_pending[i] + a, [result.next_token])
        if lane.draft is not None and d:
            # the draft was fed its old pending tokens and d[:-1]; d[-1] never went in
            fed = min(a, len(d) - 1)
            lane.draft.keep(draft_base[i] + len(draft_pending[i]) + fed, d[fed:a] + [result.next_token])
        elif lane.draft is not None:
            lane.draft.pending_cond = lane.draft.pending_uncond = draft_pending[i] + [result.next_token]


def _jacobi_step(target: Engine, lanes: list[Lane], cfg: ImageDecodeConfig) -> None:
    """Speculative Jacobi decoding (Teng et al. 2410.01699) with GSD's grouped acceptance: the
    window of guesses goes through the target with the pending token; accepted guesses and one
    emitted token are kept; the target's predictions for the positions after them become the
    next window (drawn from those predictions, which are then their q), topped up by draws from
    the last prediction."""
    base = {lane.index: lane.target.cond.length for lane in lanes}
    pending = {lane.index: len(lane.target.pending_cond) for lane in lanes}
    probs = _guided_forward(
        target,
        [lane.target for lane in lanes],
        [lane.window for lane in lanes],
        [len(lane.window) + 1 for lane in lanes],
        cfg,
    )
    for lane, p in zip(lanes, probs, strict=True):
        w = lane.window
        q_rows = torch.stack(lane.window_q) if w else p[:0]
        result = verify_chain_grouped(cfg.rule, w, p, q_rows, lane.generator)
        a = len(result.path)
        lane.codes += w[:a] + [result.next_token]
        lane.forwards += 1
        lane.drafted += len(w)
        lane.accepted += a
        lane.target.keep(base[lane.index] + pending[lane.index] + a, [result.next_token])
        room = max(0, min(cfg.draft_len, cfg.tokens_per_image - len(lane.codes) - 1))
        rows = list(range(a + 1, len(w) + 1))[:room]
        rows += [len(w)] * (room - len(rows))
        lane.window = [_sample(p[r], lane.generator) for r in rows]
        lane.window_q = [p[r] for r in rows]
