"""Token-tree structure shared by drafting and verification (acceptance rules join later)."""

from __future__ import annotations

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
