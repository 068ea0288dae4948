"""Threshold-free and low-false-positive summaries of a detector's scores (higher = positive)."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class OperatingPoint:
    tpr: float  # positives strictly above the threshold
    fpr: float  # negatives strictly above it: the rate achieved, at most the one asked for
    threshold: float
    allowed_false_positives: int  # floor(fpr asked * negatives); 0 below 1 / fpr negatives


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float = 0.01) -> OperatingPoint:
    """The operating point at the lowest threshold that at most `fpr` of the negatives exceed:
    the (k+1)-th highest negative score, k = floor(fpr * negatives). With fewer than 1 / fpr
    negatives no negative may pass, so the threshold is the highest negative score."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("an operating point needs at least one positive and one negative score")
    allowed = int(np.floor(fpr * len(neg) + 1e-9))
    threshold = float(np.sort(neg)[::-1][min(allowed, len(neg) - 1)])
    return OperatingPoint(
        float((pos > threshold).mean()), float((neg > threshold).mean()), threshold, allowed
    )
