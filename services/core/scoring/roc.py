"""Threshold-free and low-false-positive summaries of a detector's scores (higher = positive)."""

from __future__ import annotations

import numpy as np


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve = P(a positive scores above a negative), ties counting half
    (the Mann-Whitney U statistic over the product of the class sizes)."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    values = np.concatenate([pos, neg])
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    # average rank (1-based) within each run of ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float = 0.01) -> tuple[float, float]:
    """(true-positive rate, false-positive rate achieved) at the strictest threshold that lets
    at most `fpr` of the negatives through: a positive counts when it scores strictly above the
    threshold. With fewer than 1/fpr negatives the achieved rate is 0."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    allowed = int(np.floor(fpr * len(neg) + 1e-9))  # negatives that may score above the threshold
    threshold = np.sort(neg)[::-1][allowed] if allowed < len(neg) else -np.inf
    return float((pos > threshold).mean()), float((neg > threshold).mean())
