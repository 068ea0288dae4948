"""Image-token decoding through the real engines: exact speculative decoding (drafted chains and
speculative Jacobi) emits the target's guided distribution, the relaxed rules do not when
relaxed, greedy equals AR, delta = 0 equals exact draw for draw, and closing frees the KV."""

from __future__ import annotations

import pytest
import torch
from lossless import chi_square, sample_law, sharp_engines

from services.core.engine import Engine
from services.core.image_decoding import ImageDecodeConfig, Method, decode
from services.core.image_spec import GroupRule
from services.core.params import SamplingConfig
from services.core.sampling import probabilities

K, CLASS, NULL, LENGTH = 5, 5, 6, 3  # 5 codes, a class token and the null class in a vocabulary of 8
NEIGHBOURS = torch.tensor([[(x + d) % K for d in (1, 2, 3, 4)] for x in range(K)])


def guided_law(engine: Engine, cfg: ImageDecodeConfig) -> dict[tuple[int, ...], float]:
    """Exact law of LENGTH codes under guidance, from fresh prefills (no decode code involved)."""

    def probs(codes: tuple[int, ...]) -> torch.Tensor:
        def logits(prefix: int) -> torch.Tensor:
            seq = engine.new_sequence()
            out = engine.prefill(seq, [prefix, *codes])[:K].float()
            seq.release()
            return out

        c = logits(CLASS)
        if cfg.cfg_scale != 1.0:
            u = logits(NULL)
            c = u + cfg.cfg_scale * (c - u)
        return probabilities(c, cfg.sampling).double()

    law: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(LENGTH):
        law = {s + (x,): pr * float(px) for s, pr in law.items() for x, px in enumerate(probs(s)) if px > 0}
    return law


def run(target: Engine, draft: Engine | None, cfg: ImageDecodeConfig, n: int) -> dict[tuple[int, ...], int]:
    *_, state = decode(target, draft, [CLASS] * n, cfg)
    counts: dict[tuple[int, ...], int] = {}
    for lane in state.lanes:
        counts[tuple(lane.codes)] = counts.get(tuple(lane.codes), 0) + 1
    return counts


def config(method: Method, **kw) -> ImageDecodeConfig:
    base = dict(codebook_size=K, tokens_per_image=LENGTH, null_class=NULL, method=method, draft_len=2)
    base.update(kw)
    return ImageDecodeConfig(**base)


@pytest.mark.slow
def test_exact_methods_emit_the_guided_target_distribution() -> None:
    """Chi-square of n images (each its own random stream) against the exact guided law, for
    plain AR, drafted exact SD and speculative Jacobi (GSD with one-token groups). Negative
    controls in the same test: the draft's own law and LANTERN relaxed to delta = 0.6 both
    fail the same statistic, so the test has power against a sampler that is off."""
    target, draft = sharp_engines(vocab=8)
    n, cfg_scale = 1500, 2.5
    sampling = SamplingConfig(temperature=1.0)
    law = guided_law(target, config(Method.AR, cfg_scale=cfg_scale))
    crit = None
    for method, rule in [
        (Method.AR, GroupRule("exact")),
        (Method.EXACT_SD, GroupRule("exact")),
        (Method.GSD, GroupRule("gsd", cos_dist=torch.zeros(K, K), size=1)),
    ]:
        cfg = config(method, cfg_scale=cfg_scale, sampling=sampling, seed=7, rule=rule)
        chi2, crit = chi_square(run(target, draft, cfg, n), law, n)
        assert chi2 < crit, f"{method.value}: chi2={chi2:.1f} >= {crit:.1f}"
    draft_law = guided_law(draft, config(Method.AR, cfg_scale=cfg_scale))
    wrong, crit = chi_square(sample_law(draft_law, n, seed=3), law, n)
    assert wrong > crit, f"the draft's own law passes: {wrong:.1f} <= {crit:.1f}"
    relaxed = config(
        Method.LANTERN,
        cfg_scale=cfg_scale,
        seed=7,
        rule=GroupRule("lantern", neighbours=NEIGHBOURS, delta=0.6),
    )
    biased, crit = chi_square(run(target, draft, relaxed, n), law, n)
    assert biased > crit, f"LANTERN at delta 0.6 passes as exact: {biased:.1f} <= {crit:.1f}"


def test_lantern_at_delta_zero_is_exact_sd_draw_for_draw_and_greedy_is_ar() -> None:
    target, draft = sharp_engines(vocab=8)
    exact = config(Method.EXACT_SD, cfg_scale=2.0, seed=5, sampling=SamplingConfig(temperature=1.0))
    lantern = config(
        Method.LANTERN,
        cfg_scale=2.0,
        seed=5,
        sampling=SamplingConfig(temperature=1.0),
        rule=GroupRule("lantern", neighbours=NEIGHBOURS, delta=0.0),
    )
    a = [lane.codes for lane in list(decode(target, draft, [CLASS] * 64, exact))[-1].lanes]
    b = [lane.codes for lane in list(decode(target, draft, [CLASS] * 64, lantern))[-1].lanes]
    assert a == b
    greedy = SamplingConfig(temperature=0.0)
    ar = [
        lane.codes
        for lane in list(decode(target, None, [CLASS] * 4, config(Method.AR, sampling=greedy)))[-1].lanes
    ]
    for method in (Method.EXACT_SD, Method.GSD):
        got = list(decode(target, draft, [CLASS] * 4, config(method, sampling=greedy)))[-1].lanes
        assert [lane.codes for lane in got] == ar


def test_closing_a_decode_midway_frees_every_block() -> None:
    target, draft = sharp_engines(vocab=8)
    free_t, free_d = target.pool.free_blocks, draft.pool.free_blocks
    steps = decode(target, draft, [CLASS] * 3, config(Method.EXACT_SD, cfg_scale=2.0, tokens_per_image=12))
    state = next(steps)
    assert not state.done and target.pool.free_blocks < free_t
    steps.close()
    assert (target.pool.free_blocks, draft.pool.free_blocks) == (free_t, free_d)
