"""Target-side conversions and request checks: VerifyRequest / TokenTree / Tensor -> domain."""

from __future__ import annotations

import math

import numpy as np
import torch

from services.core.errors import InvalidArgument
from services.core.params import SamplingConfig
from services.core.spec import Rule
from services.core.verification import normalise_draft_distribution
from services.runtime.protocol import sampling_config
from specmesh.v1 import common_pb2, target_pb2

RULES = {
    common_pb2.ACCEPTANCE_RULE_GREEDY: Rule.GREEDY,
    common_pb2.ACCEPTANCE_RULE_CHAIN: Rule.CHAIN,
    common_pb2.ACCEPTANCE_RULE_TREE_IID: Rule.TREE_IID,
    common_pb2.ACCEPTANCE_RULE_TREE_WITHOUT_REPLACEMENT: Rule.TREE_WITHOUT_REPLACEMENT,
    common_pb2.ACCEPTANCE_RULE_SPECTR_KSEQ: Rule.SPECTR_KSEQ,
}
DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": None}


def rule_from_proto(value: int, greedy: bool, nodes: int) -> Rule:
    """Greedy sampling (T = 0) always verifies by argmax matching, lossless for any tree, so
    the rule is ignored then. When sampling, the rule must say how the children were drawn (the
    one Propose returned): guessing one would bias the output for trees drawn otherwise, so an
    unspecified rule is refused, except for an empty tree, where no rule is applied."""
    if greedy:
        return Rule.GREEDY
    if value not in RULES and value != common_pb2.ACCEPTANCE_RULE_UNSPECIFIED:
        raise InvalidArgument(f"unknown acceptance rule {value}", "rule")
    if value == common_pb2.ACCEPTANCE_RULE_UNSPECIFIED:
        if nodes == 0:
            return Rule.TREE_IID  # nothing to accept: every rule just samples the next token
        raise InvalidArgument(
            "is unspecified, but sampling (temperature > 0) needs the rule the tree's children "
            "were drawn under: pass the rule Propose returned (CHAIN, TREE_IID, "
            "TREE_WITHOUT_REPLACEMENT or SPECTR_KSEQ)",
            "rule",
        )
    if RULES[value] is Rule.GREEDY:
        raise InvalidArgument(
            "rule GREEDY (argmax matching) is only lossless with greedy sampling (temperature 0)", "rule"
        )
    return RULES[value]


def tensor_from_proto(t: common_pb2.Tensor, field: str) -> torch.Tensor:
    if t.dtype not in DTYPES:
        raise InvalidArgument(f"dtype {t.dtype!r} is not one of {sorted(DTYPES)}", f"{field}.dtype")
    bad = [d for d in t.shape if d < 0]
    if bad:
        raise InvalidArgument(f"dimensions must be >= 0, got shape {list(t.shape)}", f"{field}.shape")
    # Python ints: no int64 overflow on huge shapes; shape [] is a scalar (one element)
    n = math.prod(t.shape)
    if t.dtype == "bfloat16":
        raw = np.frombuffer(t.data, dtype=np.uint16)
        if raw.size != n:
            raise InvalidArgument(f"{len(t.data)} bytes do not hold shape {list(t.shape)}", f"{field}.data")
        return torch.from_numpy(raw.astype(np.int32) << 16).view(torch.float32).reshape(list(t.shape))
    dtype = DTYPES[t.dtype]
    if len(t.data) != n * np.dtype(dtype).itemsize:
        raise InvalidArgument(f"{len(t.data)} bytes do not hold {t.dtype} {list(t.shape)}", f"{field}.data")
    return torch.from_numpy(np.frombuffer(t.data, dtype=dtype).astype(np.float32)).reshape(list(t.shape))


def draft_distributions(tree: common_pb2.TokenTree, vocab_size: int) -> dict[int, torch.Tensor]:
    """expanded -> {node: dense q [V] float64}, validated (finite, >= 0, sums to 1)."""
    out: dict[int, torch.Tensor] = {}
    for e in tree.expanded:
        if not -1 <= e.node < len(tree.tokens):
            raise InvalidArgument(f"expanded node {e.node} is not -1 or a node index", "tree.expanded")
        if e.node in out:
            raise InvalidArgument(f"node {e.node} has two draft distributions", "tree.expanded")
        kind = e.distribution.WhichOneof("kind")
        if kind == "sparse":
            ids, probs = list(e.distribution.sparse.ids), list(e.distribution.sparse.probs)
            if len(ids) != len(probs):
                raise InvalidArgument(
                    f"node {e.node}: {len(ids)} ids but {len(probs)} probs", "tree.expanded"
                )
            if any(not 0 <= i < vocab_size for i in ids) or len(set(ids)) != len(ids):
                raise InvalidArgument(
                    f"node {e.node}: ids must be distinct and in [0, {vocab_size})", "tree.expanded"
                )
            q = torch.zeros(vocab_size, dtype=torch.float64)
            q[ids] = torch.tensor(probs, dtype=torch.float64)
        elif kind == "dense":
            q = tensor_from_proto(e.distribution.dense, "tree.expanded.distribution.dense").double()
            if q.shape != (vocab_size,):
                raise InvalidArgument(
                    f"node {e.node}: dense shape {list(q.shape)} != [{vocab_size}]", "tree.expanded"
                )
        else:
            raise InvalidArgument(f"node {e.node}: distribution is empty", "tree.expanded")
        out[e.node] = normalise_draft_distribution(q, e.node)
    return out


def verify_params(request: target_pb2.VerifyRequest, vocab_size: int) -> tuple[SamplingConfig, Rule]:
    """The checks of a VerifyRequest that need neither the session nor tensors, naming the field:
    sampling, new tokens and the acceptance rule."""
    cfg = sampling_config(request.sampling)
    cfg.validate(vocab_size)
    if not request.session.new_tokens:
        raise InvalidArgument(
            "needs at least one new token (the previous round's next_token)", "session.new_tokens"
        )
    return cfg, rule_from_proto(request.rule, cfg.greedy, len(request.tree.tokens))
