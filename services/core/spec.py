"""Token-tree structure shared by drafting and verification (acceptance rules join later)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

from services.core.errors import InvalidArgument


def validate_tree(parents: list[int], field: str = "tree.parents") -> None:
    """Parents must precede children (topological order) and -1 marks a root child."""
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise InvalidArgument(
                f"node {i} has parent {p}; parents must be -1 or an earlier node index (0..{i - 1}), "
                "which also rules out cycles",
                field,
            )


def tree_depths(parents: list[int]) -> list[int]:
    """Depth of each node, 0 for children of the last committed token."""
    depths: list[int] = []
    for p in parents:
        depths.append(0 if p < 0 else depths[p] + 1)
    return depths


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[n, n] bool: node i may attend to node j iff j is i or an ancestor of i."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


def chain_parents(n: int) -> list[int]:
    return list(range(-1, n - 1))


# --- acceptance rules -----------------------------------------------------------------------
#
# Verification walks the tree from the root (the last committed token). At each node it knows
# the target distribution p over the next token (already shaped by temperature/top-k/top-p)
# and, for sampled drafts, the draft distribution q the node's children were drawn from. A
# node's outcome is either "accept child j" (walk on) or "stop and emit a token from the
# residual distribution". Each rule below gives those outcome probabilities in closed form;
# `verify` then draws one outcome per node with the round's generator. Losslessness means the
# emitted token at every step is distributed as p (tests enumerate this exactly).


class Rule(StrEnum):
    GREEDY = "greedy"  # argmax matching; children may be any deterministic set
    CHAIN = "chain"  # one child per node drawn from q (Leviathan et al.; Chen et al.)
    TREE_IID = "tree_iid"  # children drawn i.i.d. from q (SpecInfer)
    TREE_WITHOUT_REPLACEMENT = "tree_without_replacement"  # children drawn without replacement (Sequoia)
    SPECTR_KSEQ = "spectr_kseq"  # k i.i.d. children, K-SEQ acceptance (SpecTr)


@dataclass
class NodeOutcome:
    accept: torch.Tensor  # [k] probability that child j is the accepted one
    residual: torch.Tensor  # [V] distribution of the emitted token when no child is accepted


def _normalise(x: torch.Tensor) -> torch.Tensor:
    s = x.sum()
    return x / s if s > 0 else x


def sequential_outcome(
    p: torch.Tensor, q: torch.Tensor, children: list[int], without_replacement: bool
) -> NodeOutcome:
    """Try children in order: accept x with prob min(1, p'(x)/q'(x)); on rejection
    p' <- norm(max(0, p' - q')) and, when children were drawn without replacement, also
    q' <- norm(q' with x removed). p, q: [V] float64."""
    p_cur, q_cur = p.clone(), q.clone()
    alive = 1.0  # probability that every earlier child was rejected
    accept = torch.zeros(len(children), dtype=p.dtype)
    for j, x in enumerate(children):
        # q'(x) = 0 means the draft could not have drawn x here (refused as bad input upstream).
        a = min(1.0, float(p_cur[x] / q_cur[x])) if q_cur[x] > 0 else 0.0
        accept[j] = alive * a
        alive *= 1.0 - a
        if alive <= 0.0:
            break
        p_cur = _normalise(torch.clamp(p_cur - q_cur, min=0.0))
        if without_replacement:
            q_cur[x] = 0.0
            q_cur = _normalise(q_cur)
    return NodeOutcome(accept, p_cur)


def kseq_rho(
    p: torch.Tensor, q: torch.Tensor, k: int, rounds: int = 3, grid: int = 32
) -> tuple[float, float]:
    """Smallest rho in [1, k] (to grid precision) with rho * beta(rho) >= 1 - (1 - beta(rho))^k,
    where beta(rho) = sum_x min(q(x), p(x)/rho); that keeps the K-SEQ residual non-negative.

    rho = k always qualifies (Bernoulli's inequality), so the search returns a feasible rho;
    each round evaluates a grid at once and zooms into the first feasible cell.
    """

    def beta(rhos: torch.Tensor) -> torch.Tensor:  # [G] -> [G]
        return torch.minimum(q[None, :], p[None, :] / rhos[:, None]).sum(-1)

    lo, hi = 1.0, float(k)
    b = beta(torch.tensor([lo], dtype=p.dtype))
    if lo * float(b) >= 1.0 - (1.0 - float(b)) ** k - 1e-12:
        return lo, float(b)
    for _ in range(rounds):
        rhos = torch.linspace(lo, hi, grid + 1, dtype=p.dtype)[1:]
        bs = beta(rhos)
        ok = rhos * bs >= 1.0 - (1.0 - bs) ** k - 1e-12
        first = int(ok.to(torch.int8).argmax())  # ok[-1] is always True (it is the previous hi)
        lo, hi = (lo if first == 0 else float(rhos[first - 1])), float(rhos[first])
    return hi, float(beta(torch.tensor([hi], dtype=p.dtype)))


def kseq_outcome(p: torch.Tensor, q: torch.Tensor, children: list[int]) -> NodeOutcome:
    """SpecTr K-SEQ over k children drawn i.i.d. from q: accept child x with prob
    min(1, p(x) / (rho q(x))) in order; if all are rejected emit from
    p_res = (p - min(q, p/rho) * (1 - (1-beta)^k) / beta) / (1-beta)^k."""
    k = len(children)
    rho, beta = kseq_rho(p, q, k)
    accept = torch.zeros(k, dtype=p.dtype)
    alive = 1.0
    for j, x in enumerate(children):
        a = min(1.0, float(p[x] / (rho * q[x]))) if q[x] > 0 else 0.0
        accept[j] = alive * a
        alive *= 1.0 - a
    if beta <= 0.0:
        return NodeOutcome(accept, p.clone())
    residual = torch.clamp(p - torch.minimum(q, p / rho) * (1.0 - (1.0 - beta) ** k) / beta, min=0.0)
    return NodeOutcome(accept, _normalise(residual))


def greedy_outcome(p: torch.Tensor, tokens: list[int]) -> NodeOutcome:
    target = int(p.argmax())
    accept = torch.tensor([1.0 if t == target else 0.0 for t in tokens], dtype=p.dtype)
    if accept.sum() > 1:  # duplicate siblings: the first match wins
        first = int(accept.argmax())
        accept.zero_()
        accept[first] = 1.0
    return NodeOutcome(accept, torch.nn.functional.one_hot(torch.tensor(target), p.shape[-1]).to(p.dtype))


def lookup_first_outcome(
    rule: Rule, p: torch.Tensor, q: torch.Tensor | None, child_tokens: list[int], lookup: int
) -> NodeOutcome:
    """Child `lookup` was proposed deterministically (prompt lookup: q = one-hot on its token t),
    the others were drawn from q as `rule` assumes. The deterministic child goes first: accepted
    with prob min(1, p(t) / 1) = p(t); otherwise t is ruled out and the drawn children face
    `rule` against p' = norm(p with t removed). Emitted law: p(t) at t, plus (1 - p(t)) times
    the inner rule's law, which is exactly p' because the drawn children do not depend on t;
    (1 - p(t)) p' = p off t, so the sum is p."""
    t = child_tokens[lookup]
    first = float(p[t])
    rest = p.clone()
    rest[t] = 0.0
    drawn = [j for j in range(len(child_tokens)) if j != lookup]
    inner = node_outcome(rule, _normalise(rest), q, [child_tokens[j] for j in drawn])
    accept = torch.zeros(len(child_tokens), dtype=p.dtype)
    accept[lookup] = first
    for k, j in enumerate(drawn):
        accept[j] = (1.0 - first) * inner.accept[k]
    return NodeOutcome(accept, inner.residual)


def node_outcome(
    rule: Rule,
    p: torch.Tensor,
    q: torch.Tensor | None,
    child_tokens: list[int],
    lookup: int | None = None,
) -> NodeOutcome:
    """lookup: index among child_tokens of a deterministically proposed child (sampled rules)."""
    if rule is Rule.GREEDY:
        return greedy_outcome(p, child_tokens)
    if lookup is not None:
        return lookup_first_outcome(rule, p, q, child_tokens, lookup)
    if not child_tokens:
        return NodeOutcome(torch.zeros(0, dtype=p.dtype), p)
    assert q is not None  # validated by the caller: sampled rules need q at every expanded node
    if rule is Rule.SPECTR_KSEQ:
        return kseq_outcome(p, q, child_tokens)
    return sequential_outcome(p, q, child_tokens, without_replacement=rule is Rule.TREE_WITHOUT_REPLACEMENT)


@dataclass
class Acceptance:
    path: list[int]  # accepted node indices, root to leaf
    next_token: int  # correction (residual draw) or bonus token after the path


def children_of(parents: list[int]) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {-1: []}
    for i, par in enumerate(parents):
        kids.setdefault(par, []).append(i)
        kids.setdefault(i, [])
    return kids


def greedy_walk(tokens: list[int], parents: list[int], argmax: list[int]) -> Acceptance:
    """Greedy acceptance from the target's argmax alone (no [V] tensors): argmax[0] is the
    target's token after the committed prefix, argmax[i + 1] its token after node i. Follow the
    child whose token is the argmax (the first such sibling) until none is; the argmax there
    is the next token."""
    kids = children_of(parents)
    path: list[int] = []
    node = -1
    while True:
        want = argmax[node + 1]
        match = next((c for c in kids[node] if tokens[c] == want), None)
        if match is None:
            return Acceptance(path, want)
        path.append(match)
        node = match


def verify(
    rule: Rule,
    tokens: list[int],
    parents: list[int],
    target_probs: torch.Tensor,
    draft_probs: dict[int, torch.Tensor],
    generator: torch.Generator | None = None,
    lookup_nodes: frozenset[int] = frozenset(),
) -> Acceptance:
    """Walk the tree, accepting children by `rule`.

    target_probs: [n + 1, V]; row 0 is p after the last committed token, row i + 1 is p after
    node i. draft_probs: node index (-1 = root) -> q [V] its children were drawn from.
    lookup_nodes: nodes proposed deterministically instead (at most one per parent; see
    lookup_first_outcome).
    """
    if rule is Rule.GREEDY:
        return greedy_walk(tokens, parents, target_probs.argmax(-1).tolist())
    kids = children_of(parents)
    path: list[int] = []
    node = -1
    while True:
        p = target_probs[node + 1].double()
        children = kids[node]
        q = draft_probs.get(node)
        lookup = next((j for j, c in enumerate(children) if c in lookup_nodes), None)
        outcome = node_outcome(
            rule, p, None if q is None else q.double(), [tokens[c] for c in children], lookup
        )
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        cum = torch.cumsum(outcome.accept, 0)
        j = int((cum <= u).sum()) if len(children) else 0
        if j < len(children):
            node = children[j]
            path.append(node)
            continue
        residual = outcome.residual
        if residual.sum() <= 0:
            residual = p
        return Acceptance(path, int(torch.multinomial(residual.float(), 1, generator=generator)))
