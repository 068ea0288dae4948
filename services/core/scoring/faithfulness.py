"""Soft faithfulness of an importance vector: soft normalised sufficiency and comprehensiveness
(Zhao & Aletras, "Incorporating Attribution Importance for Improving Faithfulness Metrics",
ACL 2023), the metrics ReAGent (arXiv 2402.00794) is evaluated with.

For a target token y after the context x (and the target tokens before y), with p(.) the target
model's probability of y:

    sufficiency     S(x') = 1 - max(0, p(x) - p(x'))        x' keeps what the importance says matters
    comprehensive.  C(x') = max(0, p(x) - p(x'))            x' removes it
    soft NS = max(0, S(x'_keep) - S(x_0)) / (1 - S(x_0))    x_0: every context embedding zeroed
    soft NC = C(x'_remove) / (1 - S(x_0))

1 - S(x_0) = p(x) - p(x_0) is what the whole context is worth to the token; where it is 0 (the
token is as likely without the context) neither metric is defined and both are NaN.

"Soft" perturbation: each element of a context token's input embedding is kept with
probability q_i (sufficiency) or 1 - q_i (comprehensiveness), q the importance normalised to a
distribution over the context (as ReAGent's own scores are), so every method spends the same
budget: one token's worth of embedding kept, or removed. (Scaled to a maximum of 1 instead, a
flat random vector would keep or remove half of every token and saturate both metrics.) Both
metrics use the same uniform draws (u < q keeps for sufficiency, u >= q for comprehensiveness:
complementary masks), `samples` draws per token, shared by all target tokens and, given the
same generator state, by every method, so methods are compared on the same random numbers. The
masked probabilities are averaged over the draws before the metric. The start token and the
target prefix are never masked. Forwards go through services.core.scoring.dense_forward
(embeddings in, no KV cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.core.model import LlamaModel
from services.core.scoring.dense_forward import embed, forward_embeddings

DEFAULT_SAMPLES = 2  # mask draws per target token and metric (the paper draws one)
SUPPORT_EPS = 1e-6  # below this the context is worth nothing to the token: metrics undefined
ROW_TOKENS = 4096  # padded tokens per dense forward: bounds activation memory


@dataclass
class Faithfulness:
    sufficiency: torch.Tensor  # [m] soft normalised sufficiency per target token, NaN = undefined
    comprehensiveness: torch.Tensor  # [m]

    def means(self) -> tuple[float, float]:
        """(sufficiency, comprehensiveness) averaged over the tokens where they are defined."""
        return _nanmean(self.sufficiency), _nanmean(self.comprehensiveness)


def _nanmean(x: torch.Tensor) -> float:
    defined = x[~x.isnan()]
    return float(defined.mean()) if len(defined) else math.nan


def normalise(importance: torch.Tensor) -> torch.Tensor:
    """[m, n] -> [m, n], each row a distribution over the context: the same budget (one token's
    worth of embedding) for every method, so a method wins by placing it, not by spending more.
    Negative scores (gradient x input: the token argues against the target) count 0; a row with
    nothing positive is spread evenly."""
    positive = importance.double().clamp_min(0)
    total = positive.sum(-1, keepdim=True)
    uniform = torch.full_like(positive, 1 / importance.shape[-1])
    return torch.where(total > 0, positive / total.clamp_min(1e-300), uniform)


def normalised_scores(
    p: torch.Tensor, p_keep: torch.Tensor, p_remove: torch.Tensor, p_zero: torch.Tensor
) -> Faithfulness:
    """Soft NS and NC [m] from the target-token probabilities [m] with the whole context (p),
    with the important part kept (p_keep) or removed (p_remove), and with none of it (p_zero)."""
    p, p_keep, p_remove, p_zero = (t.double() for t in (p, p_keep, p_remove, p_zero))
    support = p - p_zero  # = 1 - S(x_0)
    sufficiency = 1 - (p - p_keep).clamp_min(0)
    sufficiency_zero = 1 - support.clamp_min(0)
    ns = (sufficiency - sufficiency_zero).clamp_min(0) / support
    nc = (p - p_remove).clamp_min(0) / support
    undefined = support <= SUPPORT_EPS
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return Faithfulness(torch.where(undefined, nan, ns), torch.where(undefined, nan, nc))


def _target_probs(
    model: LlamaModel, embeds: list[torch.Tensor], rows: list[list[int]], targets: list[list[int]]
) -> list[torch.Tensor]:
    """p(targets[b][i]) at rows[b][i] of each embedding row embeds[b] [L_b, D], right-padded and
    forwarded ROW_TOKENS padded tokens at a time -> [len(rows[b])] each."""
    out: list[torch.Tensor] = []
    start = 0
    while start < len(embeds):
        end, longest = start + 1, len(embeds[start])
        while end < len(embeds) and max(longest, len(embeds[end])) * (end + 1 - start) <= ROW_TOKENS:
            longest = max(longest, len(embeds[end]))
            end += 1
        batch = torch.nn.utils.rnn.pad_sequence(embeds[start:end], batch_first=True)  # [b, L, D]
        flat = torch.tensor([i * longest + r for i, rs in enumerate(rows[start:end]) for r in rs])
        logp = forward_embeddings(model, batch, flat).log_softmax(-1)  # [N, V]
        chosen = logp.gather(-1, torch.tensor([t for ts in targets[start:end] for t in ts])[:, None])[:, 0]
        out += chosen.exp().split([len(rs) for rs in rows[start:end]])
        start = end
    return out


@torch.no_grad()
def soft_faithfulness(
    model: LlamaModel,
    start: int,
    context: list[int],
    target: list[int],
    importance: torch.Tensor,
    samples: int,
    generator: torch.Generator,
) -> Faithfulness:
    """Soft NS / NC [m] of importance [m, n] over the context for each target token (see the
    module docstring); samples >= 1 mask draws per token."""
    n, m = len(context), len(target)
    q = normalise(importance).float()  # [m, n]
    e = embed(model, torch.tensor([start, *context, *target[:-1]]))  # [n + m, D]
    zero = e.clone()
    zero[1 : n + 1] = 0
    u = torch.rand(samples, n, e.shape[1], generator=generator)  # [S, n, D]
    embeds, rows, targets = [e, zero], [list(range(n, n + m))] * 2, [target] * 2
    for j in range(m):
        row = e[: n + 1 + j]  # start, context, target[:j]: its last position predicts target[j]
        keep = u < q[j][None, :, None]  # [S, n, D]
        for mask in (keep, ~keep):  # sufficiency's draws, then comprehensiveness'
            for s in range(samples):
                masked = row.clone()
                masked[1 : n + 1] *= mask[s]
                embeds.append(masked)
                rows.append([n + j])
                targets.append([target[j]])
    probs = _target_probs(model, embeds, rows, targets)
    p, p_zero = probs[0], probs[1]
    per_token = torch.cat(probs[2:]).view(m, 2 * samples)  # per target token: keep draws, remove draws
    p_keep = per_token[:, :samples].mean(-1)  # [m]
    p_remove = per_token[:, samples:].mean(-1)
    return normalised_scores(p, p_keep, p_remove, p_zero)
