"""Relaxed acceptance rules for image tokens: LANTERN and GSD, next to the exact chain rule of
services.core.spec.

Both accept a drafted token x by the probability mass of a *group* of tokens that decode to
nearly the same picture, instead of x alone. With a group G(x) containing x:

    accept x with probability  min(1, p(G) / q(G))        p(G) = sum_{y in G} p(y)
    on rejection emit from      norm(max(0, p - q)) with G zeroed

This is the exact chain rule (Leviathan et al. 2211.17192) applied to the coarsened
distributions in which G is one outcome and every other token its own; the emitted token then
lies in G with probability p(G) whenever the group does not depend on the draw, so the loss is
bounded by how much mass the coarsening moves. With G = {x} both lines are the exact rule: a
rejected x has p(x) < q(x), so zeroing it changes nothing.

- LANTERN (Jang et al., arXiv 2410.03355): G = {x} plus the longest prefix of x's k nearest
  codebook vectors (latent neighbours, nearest first) whose target mass sums to at most delta.
  Moving that mass onto x changes p by exactly that sum in total variation, so each step's
  relaxed target stays within TV delta of p. delta = 0 is the exact rule.
- GSD (So et al., arXiv 2508.07747, junhyukso/GSD), on speculative Jacobi decoding: G = the
  tokens within a window of x in the target's probability ranking that are also close to x
  in latent space (cosine distance of code vectors) and close in target probability: the
  "visually valid" tokens the model cannot tell apart. Training-free; group size 1 is exact.

All functions are pure: p, q are [V] float64 distributions over the image codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.core.spec import Acceptance

# GSD's filters (the reference implementation's defaults): a group member's probability differs
# from the drafted token's by less than P_TOL, and its code vector's cosine distance is below
# LATENT_TOL.
GSD_P_TOL = 0.15
GSD_LATENT_TOL = 0.5


def grouped_outcome(p: torch.Tensor, q: torch.Tensor, group: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(acceptance probability, residual [V]) of a drafted token whose group is `group` (ids,
    the drafted token among them)."""
    pg, qg = float(p[group].sum()), float(q[group].sum())
    accept = 1.0 if qg <= 0.0 else min(1.0, pg / qg)
    residual = torch.clamp(p - q, min=0.0)
    residual[group] = 0.0
    s = residual.sum()
    return accept, (residual / s if s > 0 else p)


def lantern_group(p: torch.Tensor, x: int, neighbours: torch.Tensor, delta: float) -> torch.Tensor:
    """x plus the longest prefix of `neighbours` [k] (x's nearest codes, nearest first) whose
    target mass is at most delta: the TV distance between p and p with that mass moved onto x."""
    if delta <= 0.0 or len(neighbours) == 0:
        return torch.tensor([x])
    mass = torch.cumsum(p[neighbours], 0)  # [k]
    m = int((mass <= delta + 1e-12).to(torch.int8).cumprod(0).sum())
    return torch.cat([torch.tensor([x]), neighbours[:m]])


def gsd_group(p: torch.Tensor, x: int, latent_cos_dist: torch.Tensor, size: int) -> torch.Tensor:
    """x plus up to size - 1 tokens nearest to x in the target's ranking (half above, half
    below) that pass GSD's probability and latent-distance filters. latent_cos_dist: [V] cosine
    distance of every code vector to x's."""
    if size <= 1:
        return torch.tensor([x])
    order = torch.argsort(p, descending=True)
    rank = int((order == x).nonzero()[0, 0])
    half = size // 2
    window = order[max(0, rank - half) : rank + half + 1]
    keep = (window == x) | (
        ((p[window] - p[x]).abs() < GSD_P_TOL) & (latent_cos_dist[window] < GSD_LATENT_TOL)
    )
    group = window[keep]
    return torch.cat([torch.tensor([x]), group[group != x]])[:size]


@dataclass(frozen=True)
class GroupRule:
    """Which group a drafted token is judged by. kind: "exact" | "lantern" | "gsd"."""

    kind: str
    neighbours: torch.Tensor | None = None  # [V, k] nearest codes (LANTERN)
    delta: float = 0.0
    cos_dist: torch.Tensor | None = None  # [V, V] cosine distances of code vectors (GSD)
    size: int = 1

    def group(self, p: torch.Tensor, x: int) -> torch.Tensor:
        if self.kind == "lantern":
            assert self.neighbours is not None
            return lantern_group(p, x, self.neighbours[x], self.delta)
        if self.kind == "gsd":
            assert self.cos_dist is not None
            return gsd_group(p, x, self.cos_dist[x], self.size)
        return torch.tensor([x])


def verify_chain_grouped(
    rule: GroupRule,
    tokens: list[int],
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> Acceptance:
    """Walk a drafted chain with the grouped rule.

    tokens: [n] drafted ids; target_probs: [n + 1, V], row i is p before token i (row n: after
    the whole chain, for the bonus); draft_probs: [n, V], row i is the q token i was drawn from.
    Draws one uniform per visited node and one multinomial at the end, in the same order as
    services.core.spec.verify, so with groups of one token (delta = 0, size = 1) the same
    generator gives the same tokens as the exact chain rule.
    """
    path: list[int] = []
    for i, x in enumerate(tokens):
        p, q = target_probs[i].double(), draft_probs[i].double()
        accept, residual = grouped_outcome(p, q, rule.group(p, x))
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if u < accept:
            path.append(i)
            continue
        return Acceptance(path, int(torch.multinomial(residual.float(), 1, generator=generator)))
    torch.rand((), generator=generator, dtype=torch.float64)  # the leaf's draw, as spec.verify makes
    bonus = target_probs[len(tokens)].double()
    return Acceptance(path, int(torch.multinomial(bonus.float(), 1, generator=generator)))


def cosine_distances(codebook: torch.Tensor) -> torch.Tensor:
    """[V, dim] code vectors -> [V, V] cosine distances (1 - cosine similarity)."""
    unit = torch.nn.functional.normalize(codebook.double(), dim=-1)
    return 1.0 - unit @ unit.t()
