"""The PAWN-style network (services/core/scoring/pawn.py): its inputs from TokenFeatures, padding
that changes nothing, a gate that weights tokens (a distribution per text), and the
standardisation it carries."""

from __future__ import annotations

import torch

from services.core.scoring.features import token_features
from services.core.scoring.pawn import FEATURE_NAMES, PawnNet, token_inputs


def test_token_inputs_follow_the_features() -> None:
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    f = token_features(logits, targets)
    x = token_inputs(f)
    assert x.shape == (7, len(FEATURE_NAMES)) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x[:, 0], f.logprob) and torch.allclose(x[:, 1], f.rank.float().log())
    assert torch.allclose(x[:, 5], -f.logprob - f.entropy)


def test_padding_changes_nothing_and_the_gate_matters() -> None:
    torch.manual_seed(0)
    net = PawnNet(hidden_size=12, width=6).eval()
    net.set_standardisation(torch.full((len(FEATURE_NAMES),), 0.5), torch.full((len(FEATURE_NAMES),), 2.0))
    x, h = torch.randn(2, 5, len(FEATURE_NAMES)), torch.randn(2, 5, 12)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2])
    with torch.no_grad():
        both = net(x, h, mask)
        second_alone = net(x[1:, :3], h[1:, :3], mask[1:, :3])
        garbage = x.clone()
        garbage[1, 3:] = 1e6  # whatever sits in the padding
        assert torch.allclose(net(garbage, h, mask), both)
    assert torch.allclose(both[1], second_alone[0], atol=1e-6)
    # the logit is a gated average of per-token values: a uniform gate would give their mean
    with torch.no_grad():
        values = net.value(
            torch.cat(
                [(x - net.feature_mean) / net.feature_std, torch.tanh(net.hidden_proj(net.hidden_norm(h)))],
                -1,
            )
        )[..., 0]
    assert not torch.allclose(both[0], values[0].mean())
    assert values[0].min() <= both[0] <= values[0].max()
