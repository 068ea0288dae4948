"""bench route's figures from recorded outcomes: ratios against policy target, the target's share
of output tokens per policy (auto: per the policy it chose), the NLL gap closed."""

from __future__ import annotations

import pytest

from bench.route import Outcome, Run, _gap_closed, _summary, format_summary

KEYS = [("chat", 0), ("chat", 1)]


def run(name: str, policy: str, outcomes: list[Outcome], **kw) -> Run:
    r = Run(name, policy, **kw)
    r.outcomes = dict(zip(KEYS, outcomes, strict=True))
    return r


def test_summary_ratios_shares_and_gap() -> None:
    target = run("target", "target", [Outcome([1, 2, 3, 4], 2.0, nll=0.5), Outcome([5, 6], 1.0, nll=0.5)])
    draft = run("draft", "draft", [Outcome([1, 9, 9, 9], 0.5, nll=2.5), Outcome([5, 6], 0.25, nll=2.5)])
    r2r = run(
        "r2r", "r2r", [Outcome([1, 2, 9, 9], 1.0, routed=1, nll=1.5), Outcome([5, 6], 0.5, routed=1, nll=1.5)]
    )
    auto = run(
        "auto",
        "auto",
        [Outcome([1, 2, 3, 4], 1.0, chosen="speculative"), Outcome([5, 6], 0.2, chosen="draft")],
        quality="fast",
    )
    base = _summary(target, target)
    assert base["tokens_per_s"] == pytest.approx(2.0) and base["speedup_vs_target"] == pytest.approx(1.0)
    d = _summary(draft, target)
    assert d["speedup_vs_target"] == pytest.approx(4.0) and d["target_share"] == 0.0
    assert d["exact_match"] == 0.5  # the second prompt's output happens to be the target's
    s = _summary(r2r, target)
    assert s["target_share"] == pytest.approx(2 / 6) and s["speedup_vs_target"] == pytest.approx(2.0)
    assert _gap_closed(s, d, base) == pytest.approx(0.5)  # NLL 1.5 halfway from 2.5 to 0.5
    a = _summary(auto, target)
    assert a["target_share"] == pytest.approx(4 / 6) and a["chosen"] == {"draft": 1, "speculative": 1}
    result = {
        "policies": {"target": base, "draft": d, "r2r": s | {"nll_gap_closed": 0.5}, "auto": a},
        "sweep": [],
        "machine": {"cpu_model": "test CPU"},
        "targets_met": {},
    }
    text = format_summary(result)
    assert "r2r" in text and "test CPU" in text and "2.00x" in text
