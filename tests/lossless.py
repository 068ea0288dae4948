"""Harness for losslessness tests through the real drafter and the real verification.

Three instruments, each with the tensor shapes it expects:
- `sharp_engines`: tiny random Llama engines whose logits are scaled so that the draft's
  distribution q and the target's p differ substantially (total variation >= 0.3); random
  engines straight from init have logits within +-0.06, where p ~ q ~ uniform and a broken
  verifier passes.
- `enumerate_proposals` + `round_law`: exact enumeration. Every outcome of every draw the
  drafter makes goes through `ScriptedDraw` (the drafter's ChildDraw seam), so the real tree
  construction runs once per outcome; `round_law` then gives the exact law of the first
  emitted tokens for one tree from the real acceptance rules (spec.node_outcome).
- `sample_pairs` + `chi_square`: Monte Carlo of the first two emitted tokens through
  `Drafter.propose` and `verification.verify_round` (tree forward, masks, KV compaction,
  the uniform-driven walk), and a chi-square statistic against the exact law.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable

import torch
from tiny_models import tiny_config

from services.core.drafting import (
    Budget,
    ChildDraw,
    Drafter,
    DraftTree,
    Strategy,
    add_prompt_lookup,
    prompt_lookup_tree,
)
from services.core.engine import Engine
from services.core.params import SamplingConfig
from services.core.sampling import probabilities
from services.core.spec import children_of, node_outcome
from services.core.verification import verify_round

Law = dict[tuple[int, ...], float]

SETTINGS = {
    "T1": SamplingConfig(temperature=1.0),
    "T0.6": SamplingConfig(temperature=0.6),
    "top_k5": SamplingConfig(temperature=1.0, top_k=5),
    "top_p0.8": SamplingConfig(temperature=1.0, top_p=0.8),
}


def sharp_engines(vocab: int = 8, target_scale: float = 40.0, draft_scale: float = 40.0):
    """(target, draft): 2-layer and 1-layer random engines with logits scaled through the final
    norm's weight (the only change to their random init)."""
    target = Engine.from_config(tiny_config(vocab_size=vocab), seed=1, block_size=4)
    draft = Engine.from_config(tiny_config(vocab_size=vocab, num_hidden_layers=1), seed=2, block_size=4)
    with torch.no_grad():
        target.model.norm.weight.mul_(target_scale)
        draft.model.norm.weight.mul_(draft_scale)
    return target, draft


class NextTokenLaw:
    """p(. | context) [V] float64 under a sampling config, from a fresh prefill (memoised)."""

    def __init__(self, engine: Engine, sampling: SamplingConfig) -> None:
        self.engine, self.sampling, self._cache = engine, sampling, {}

    def __call__(self, context: tuple[int, ...]) -> torch.Tensor:
        if context not in self._cache:
            seq = self.engine.new_sequence()
            logits = self.engine.prefill(seq, list(context))
            seq.release()
            probs = probabilities(logits, self.sampling).double()
            self._cache[context] = probs / probs.sum()  # exact in float64: laws compare at 1e-12
        return self._cache[context]


def sequence_law(p: NextTokenLaw, prompt: tuple[int, ...], length: int) -> Law:
    """Exact law of the next `length` tokens when sampling token by token from p."""
    law: Law = {(): 1.0}
    for _ in range(length):
        grown: Law = {}
        for seq, pr in law.items():
            probs = p(prompt + seq)
            for x in torch.nonzero(probs).flatten().tolist():
                grown[seq + (x,)] = pr * float(probs[x])
        law = grown
    return law


def total_variation(a: Law, b: Law) -> float:
    return 0.5 * sum(abs(a.get(s, 0.0) - b.get(s, 0.0)) for s in set(a) | set(b))


# --- exact enumeration ------------------------------------------------------------------------


def _outcomes(q: torch.Tensor, count: int, replacement: bool) -> list[tuple[list[int], float]]:
    """Every draw sequence of `count` positions from q [n] with its probability."""
    qd = q.double()
    support = torch.nonzero(qd > 0).flatten().tolist()
    seqs = (
        itertools.product(support, repeat=count)
        if replacement
        else itertools.permutations(support, min(count, len(support)))
    )
    out = []
    for picks in seqs:
        prob, mass = 1.0, float(qd.sum())
        for x in picks:
            prob *= float(qd[x]) / mass
            if not replacement:
                mass -= float(qd[x])
        out.append((list(picks), prob))
    return out


class ScriptedDraw:
    """A ChildDraw that follows `script` (one outcome index per draw call) and, past its end,
    takes outcome 0 and records how many there were, so a depth-first search over scripts
    visits every combination of outcomes exactly once."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.taken, self.sizes, self.prob = script, [], [], 1.0

    def __call__(self, q: torch.Tensor, count: int, replacement: bool) -> list[int]:
        options = _outcomes(q, count, replacement)
        i = len(self.taken)
        choice = self.script[i] if i < len(self.script) else 0
        self.taken.append(choice)
        self.sizes.append(len(options))
        picks, prob = options[choice]
        self.prob *= prob
        return picks


def enumerate_proposals(propose: Callable[[ChildDraw], DraftTree]) -> list[tuple[DraftTree, float]]:
    """[(tree, probability)] over every way the drafter's draws can come out."""
    results, stack = [], [[]]
    while stack:
        draw = ScriptedDraw(stack.pop())
        tree = propose(draw)
        results.append((tree, draw.prob))
        for i in range(len(draw.script), len(draw.taken)):
            for alt in range(1, draw.sizes[i]):
                stack.append(draw.taken[:i] + [alt])
    assert abs(sum(p for _, p in results) - 1.0) < 1e-9
    return results


def dense(dists: dict[int, tuple[list[int], list[float]]], vocab: int) -> dict[int, torch.Tensor]:
    """Sparse draft distributions {node: (ids, probs)} -> {node: [V] float64}, renormalised in
    float64 as the target service does (verification.normalise_draft_distribution)."""
    out = {}
    for node, (ids, probs) in dists.items():
        q = torch.zeros(vocab, dtype=torch.float64)
        q[ids] = torch.tensor(probs, dtype=torch.float64)
        out[node] = q / q.sum()
    return out


def round_law(tree: DraftTree, p: NextTokenLaw, prompt: tuple[int, ...], length: int) -> Law:
    """Exact law of the first `length` tokens emitted by one verification of `tree` followed,
    once the round has ended, by sampling from p (what every later round emits when each
    round is lossless). The acceptance probabilities come from spec.node_outcome, the rule
    spec.verify draws from."""
    kids = children_of(tree.parents)
    qs = dense(tree.dists, len(p(prompt)))
    lookup_nodes = set(tree.lookup)

    def at(node: int, context: tuple[int, ...], need: int) -> Law:
        probs = p(context)
        children = kids[node]
        lookup = next((j for j, c in enumerate(children) if c in lookup_nodes), None)
        outcome = node_outcome(tree.rule, probs, qs.get(node), [tree.tokens[c] for c in children], lookup)
        law: Law = {}

        def add(token: int, weight: float, rest: Law) -> None:
            for s, pr in rest.items():
                law[(token, *s)] = law.get((token, *s), 0.0) + weight * pr

        for j, c in enumerate(children):
            a = float(outcome.accept[j])
            if a > 0:
                t = tree.tokens[c]
                add(t, a, {(): 1.0} if need == 1 else at(c, context + (t,), need - 1))
        stop = 1.0 - float(outcome.accept.sum())
        if stop > 1e-15:
            for x in torch.nonzero(outcome.residual).flatten().tolist():
                w = stop * float(outcome.residual[x])
                add(x, w, {(): 1.0} if need == 1 else sequence_law(p, context + (x,), need - 1))
        return law

    return at(-1, prompt, length)


def mixture(parts: list[tuple[Law, float]]) -> Law:
    out: Law = {}
    for law, w in parts:
        for s, pr in law.items():
            out[s] = out.get(s, 0.0) + w * pr
    return out


def propose_fn(
    draft: Engine, prompt: list[int], strategy: Strategy, budget: Budget, sampling: SamplingConfig
) -> Callable[[ChildDraw], DraftTree]:
    """propose(draw) -> the tree the real drafter builds at the prompt with those draws,
    the prompt-lookup path merged in when budget.lookup_tokens > 0."""
    seq = draft.new_sequence()
    root = draft.prefill(seq, prompt)
    drafter = Drafter(draft)

    def propose(draw: ChildDraw) -> DraftTree:
        if strategy is Strategy.PROMPT_LOOKUP:
            return prompt_lookup_tree(prompt, budget, sampling)
        tree = drafter.propose(seq, root, strategy, budget, sampling, None, draw=draw)
        if budget.lookup_tokens:
            add_prompt_lookup(tree, prompt, budget.lookup_tokens)
        return tree

    return propose


# --- Monte Carlo --------------------------------------------------------------------------------


def sample_pairs(
    target: Engine,
    draft: Engine,
    prompt: list[int],
    strategy: Strategy,
    budget: Budget,
    sampling: SamplingConfig,
    n: int,
    seed: int,
) -> Counter:
    """Counts of the first two emitted tokens over n independent speculative generations, each
    through Drafter.propose and verify_round exactly as the services call them. The prompt's
    KV is computed once; every generation truncates both sequences back to it."""
    gen = torch.Generator().manual_seed(seed)
    vocab = target.config.vocab_size
    t_seq, d_seq = target.new_sequence(), draft.new_sequence()
    target.prefill(t_seq, prompt[:-1])
    d_root = draft.prefill(d_seq, prompt)
    drafter = Drafter(draft)
    counts: Counter = Counter()
    try:
        for _ in range(n):
            out: list[int] = []
            root, t_new = d_root, [prompt[-1]]
            while len(out) < 2:
                history = prompt + out
                if strategy is Strategy.PROMPT_LOOKUP:
                    tree = prompt_lookup_tree(history, budget, sampling)
                else:
                    tree = drafter.propose(d_seq, root, strategy, budget, sampling, gen)
                    if budget.lookup_tokens:
                        add_prompt_lookup(tree, history, budget.lookup_tokens)
                r = verify_round(
                    target,
                    t_seq,
                    t_new,
                    tree.tokens,
                    tree.parents,
                    dense(tree.dists, vocab),
                    sampling,
                    tree.rule,
                    gen,
                    frozenset(tree.lookup),
                )
                emitted = [tree.tokens[i] for i in r.acceptance.path] + [r.acceptance.next_token]
                out += emitted
                if len(out) < 2:  # one token so far: the next round starts after it
                    root, t_new = draft.prefill(d_seq, emitted), emitted
            counts[tuple(out[:2])] += 1
            t_seq.truncate(len(prompt) - 1)
            d_seq.truncate(len(prompt))
    finally:
        t_seq.release()
        d_seq.release()
    return counts


def _sharp_pairs(
    engine_kwargs: dict,
    prompt: list[int],
    strategy: Strategy,
    budget: Budget,
    sampling: SamplingConfig,
    n: int,
    seed: int,
) -> Counter:
    """sample_pairs on sharp_engines(**engine_kwargs), in a worker process (one torch thread)."""
    torch.set_num_threads(1)
    target, draft = sharp_engines(**engine_kwargs)
    return sample_pairs(target, draft, prompt, strategy, budget, sampling, n, seed)


def sample_pairs_sharp(
    prompt: list[int],
    strategy: Strategy,
    budget: Budget,
    sampling: SamplingConfig,
    n: int,
    seed: int,
    workers: int = 2,
    **engine_kwargs,
) -> Counter:
    """sample_pairs on sharp_engines(**engine_kwargs), split over `workers` spawned processes
    (the Monte Carlo is single-threaded Python; CI has 2 cores). Worker w draws n // workers
    generations (the first ones one more) from its own stream, seed * 1000 + w: independent
    draws of the same process, so the counts add up to n of them."""
    import multiprocessing

    shares = [n // workers + (w < n % workers) for w in range(workers)]
    args = [
        (engine_kwargs, prompt, strategy, budget, sampling, k, seed * 1000 + w) for w, k in enumerate(shares)
    ]
    # spawn, not fork: a forked child of a process whose OpenMP runtime has started can hang
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.starmap(_sharp_pairs, args)
    return sum(parts, Counter())


def sample_law(law: Law, n: int, seed: int) -> Counter:
    """n draws from an explicit law (the negative controls' samplers)."""
    cells = list(law)
    probs = torch.tensor([law[c] for c in cells], dtype=torch.float64)
    picks = torch.multinomial(probs, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return Counter(cells[i] for i in picks.tolist())


def chi_square(counts: Counter, law: Law, n: int) -> tuple[float, float]:
    """(statistic, 99.95% critical value) of Pearson's test of counts against law; cells with an
    expected count below 5 are pooled; a sample the law cannot produce gives infinity."""
    if any(law.get(s, 0.0) <= 0.0 for s in counts):
        return math.inf, 0.0
    cells = [s for s in law if law[s] * n >= 5]
    chi2 = sum((counts.get(s, 0) - law[s] * n) ** 2 / (law[s] * n) for s in cells)
    rest_p = 1.0 - sum(law[s] for s in cells)
    dof = len(cells) - 1
    if rest_p * n >= 5:
        rest = n - sum(counts.get(s, 0) for s in cells)
        chi2 += (rest - rest_p * n) ** 2 / (rest_p * n)
        dof += 1
    z = 3.29  # 99.95% normal quantile; Wilson-Hilferty approximation of the chi-square quantile
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return chi2, crit
