"""R2R routing inputs, the router network and the cut rule (services.core.routing)."""

from __future__ import annotations

import torch

from services.core.routing import RouterNet, routed, router_inputs


def test_router_inputs_shapes_and_values() -> None:
    torch.manual_seed(0)
    n, H, C, V, k = 5, 12, 40, 60, 8
    hidden, logits = torch.randn(n, H, dtype=torch.float64), torch.randn(n, C)
    embedding, ids = torch.randn(V, H), torch.tensor([3, 0, 59, 7, 7])
    h, e, top = router_inputs(hidden, logits, ids, embedding, k)
    assert h.shape == (n, H) and e.shape == (n, H) and top.shape == (n, k)
    assert {h.dtype, e.dtype, top.dtype} == {torch.float32}
    assert torch.equal(e, embedding[ids])
    expected = torch.log_softmax(logits, -1).sort(-1, descending=True).values[:, :k]
    assert torch.allclose(top, expected)
    assert (top[:, :-1] >= top[:, 1:]).all()  # sorted descending


def test_router_inputs_pad_a_vocabulary_smaller_than_k() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    _, _, top = router_inputs(torch.zeros(1, 4), logits, torch.tensor([0]), torch.zeros(3, 4), top_k=5)
    assert top.shape == (1, 5)
    assert torch.allclose(top[0, :3].exp().sum(), torch.tensor(1.0))  # the real columns: a distribution
    assert torch.equal(top[0, 3:], torch.full((2,), -1e4))  # padding: "impossible"


def test_router_net_scores_each_row_on_its_own() -> None:
    torch.manual_seed(0)
    net = RouterNet(hidden_size=12, top_k=8, width=16).eval()
    h, e, t = torch.randn(6, 12), torch.randn(6, 12), torch.randn(6, 8)
    out = net(h, e, t)
    assert out.shape == (6,)
    assert torch.allclose(net(h[2:3], e[2:3], t[2:3]), out[2:3], atol=1e-6)  # no mixing across rows


def test_routed_cuts_at_the_first_token_above_the_threshold() -> None:
    assert routed([0.1, 0.2, 0.9, 0.95], 0.5) == 2
    assert routed([0.1, 0.5], 0.5) == 2  # strictly above
    assert routed([0.7], 0.5) == 0
    assert routed([], 0.5) == 0
