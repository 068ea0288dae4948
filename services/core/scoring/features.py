"""Per-token quantities of next-token distributions, batched over ragged texts.

Shapes: ``logp [B, T, V]`` log-probabilities (``log_softmax`` of the logits), ``targets [B, T]``
token ids, ``mask [B, T]`` bool (True = real position). Every function works row by row over
the vocabulary, so padded rows cost compute but never change a real row's value; results at
padded positions are set to 0 by :func:`masked`.

Everything is computed in float32 (the logits are upcast when they come in lower precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 log-probabilities."""
    return logits.float().log_softmax(-1)


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, T] with padded positions set to 0 (not NaN: 0 * nan would poison sums)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype))


def token_logprob(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t]) -> [B, T]."""
    return logp.gather(-1, targets[..., None].long())[..., 0]


def token_rank(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of the target under its distribution (1 = argmax; ties rank best) -> [B, T]."""
    chosen = token_logprob(logp, targets)
    return (logp > chosen[..., None]).sum(-1) + 1


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats -> [B, T]; 0 * log 0 counts as 0."""
    return -(logp.exp() * logp).nan_to_num().sum(-1)


def logprob_moments(ref_logp: torch.Tensor, score_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``score_logp(x)`` for ``x ~ softmax(ref_logp)``, analytically over the
    vocabulary -> (mean [B, T], var [B, T]).

    With ref = score this is Min-K%++'s per-position mu / sigma^2 (arXiv 2404.02936); with a
    sampling model ref and a scoring model score it is Fast-DetectGPT's analytic expectation of
    the sampled log-likelihood and its variance (arXiv 2310.05130). Two passes (the variance of
    the centred values) rather than E[s^2] - E[s]^2, which cancels catastrophically in float32.
    """
    p = ref_logp.exp()
    s = score_logp.clamp_min(torch.finfo(score_logp.dtype).min)  # -inf where p = 0 anyway: 0 * -inf = nan
    mean = (p * s).sum(-1)
    d = s - mean[..., None]
    return mean, (p * d * d).sum(-1)


def cross_entropy(ref_logp: torch.Tensor, score_logp: torch.Tensor) -> torch.Tensor:
    """-E_{x ~ ref} log score(x) in nats -> [B, T]: Binoculars' per-token cross-perplexity term
    (arXiv 2401.12070, eq. 3: the observer's distribution against the performer's log-probs)."""
    return -(ref_logp.exp() * score_logp).nan_to_num().sum(-1)


def probability_kurtosis(logp: torch.Tensor) -> torch.Tensor:
    """Excess kurtosis of the V probability values of each distribution -> [B, T].

    'Visualizing Uncertainty in Translation Tasks' (arXiv 2501.17187) averages "the kurtosis of
    token distributions" without a formula; we read it as the sample kurtosis of the V numbers
    p(v) (Fisher: m4 / m2^2 - 3, population moments): a peaked (confident) distribution has a
    few large values among many tiny ones and a very high kurtosis; a uniform one has m2 = 0
    (below float32 rounding), for which we return 0 instead of NaN.
    """
    # kurtosis is scale-free: use V * p (mean exactly 1), whose fourth powers stay inside float32's
    # range, where those of p itself (~1e-5) would underflow
    q = logp.exp() * logp.shape[-1]
    d = q - 1.0
    m2 = (d * d).mean(-1)
    m4 = (d * d * d * d).mean(-1)
    return torch.where(m2 > 1e-10, m4 / m2.clamp_min(1e-10) ** 2 - 3.0, torch.zeros((), dtype=m2.dtype))


@dataclass
class TokenFeatures:
    """Every per-token quantity the detection, membership and uncertainty scores need, [...]
    like the targets (any leading shape: a batch [B, T] or flat rows [N])."""

    logprob: torch.Tensor  # log p(x_t)
    rank: torch.Tensor  # 1 = argmax
    entropy: torch.Tensor  # nats
    var: torch.Tensor  # Var_{v~p} log p(v)
    kurtosis: torch.Tensor  # excess kurtosis of the probability values
    cross_entropy: torch.Tensor | None = None  # E_{v~observer}[-log p(v)], with an observer
    # [..., H] the scoring model's final hidden state where it predicted each token (the learned
    # detector's input), when asked for
    hidden: torch.Tensor | None = None


def token_features(
    logits: torch.Tensor, targets: torch.Tensor, observer_logits: torch.Tensor | None = None
) -> TokenFeatures:
    """logits [..., V] (the scored model, e.g. Binoculars' performer) predict targets [...];
    observer_logits [..., V] (same tokenizer) adds the cross-entropy term."""
    logp = log_probs(logits)
    _, var = logprob_moments(logp, logp)  # its mean E_p log p is -entropy
    return TokenFeatures(
        logprob=token_logprob(logp, targets),
        rank=token_rank(logp, targets),
        entropy=entropy(logp),
        var=var,
        kurtosis=probability_kurtosis(logp),
        cross_entropy=None if observer_logits is None else cross_entropy(log_probs(observer_logits), logp),
    )


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real positions of each row: x [B, T], mask [B, T] -> [B] (NaN for a row with
    no position, which callers refuse before scoring)."""
    m = mask.to(x.dtype)
    return (masked(x, mask) * m).sum(-1) / m.sum(-1)


def pad(rows: list[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-text tensors [n_b, ...] -> (padded [B, T, ...], mask [B, T])."""
    lengths = torch.tensor([len(r) for r in rows])
    out = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)
    mask = torch.arange(out.shape[1])[None, :] < lengths[:, None]
    return out, mask
