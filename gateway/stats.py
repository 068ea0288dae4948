"""Speculative statistics of one request (DESIGN.md section 7).

* rounds: target verification rounds (one target forward each);
* drafted_tokens: tree nodes the draft proposed, over all rounds;
* accepted_tokens: drafted tokens the target accepted;
* mean_accepted_length (tau): tokens each verification round produced, counting the
  correction/bonus token: (accepted_tokens + rounds) / rounds; 1.0 for plain decoding. Counted
  before stop truncation, so it measures the draft, not where the request happened to end;
* acceptance_rate: accepted_tokens / drafted_tokens, per drafted node: a 16-node tree that
  yields 2 tokens scores 12.5% however good its best path was;
* verified_path_tokens: positions the target checked along the path it walked, the accepted
  tokens plus one per round that ended on a node with children (all rejected), none when it
  ended on a leaf; path_acceptance_rate = accepted_tokens / verified_path_tokens, the per-token
  acceptance a chain reports (alpha in Leviathan et al. 2211.17192);
* rounds_by_depth[d-1] / accepted_by_depth[d-1]: rounds whose tree reached depth d, and those of
  them that accepted a token at depth d;
* r2r: routed_tokens (the target's tokens in the output), router_calls (draft tokens the router
  scored) and catch_up_tokens (tokens the target prefilled to catch up before each routed one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from specmesh.v1 import common_pb2


@dataclass
class SpecCounter:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    routed: int = 0  # r2r: tokens the target produced in place of a routed draft token
    router_calls: int = 0  # r2r: draft tokens the router scored
    catch_up: int = 0  # r2r: tokens the target prefilled before producing a routed token
    verified_path: int = 0
    depth_rounds: list[int] = field(default_factory=list)
    depth_accepted: list[int] = field(default_factory=list)

    def add_round(self, parents: Sequence[int], path: Sequence[int]) -> None:
        """One verification round: the proposed tree's `parents` (-1 = root; empty when nothing
        was drafted) and the accepted `path` (node indices from the root)."""
        last = -1
        for node in path:
            if not 0 <= node < len(parents) or parents[node] != last:
                raise ValueError(f"path {list(path)} is not a root-to-node path of parents {list(parents)}")
            last = node
        depth = tree_depth(parents)
        self.rounds += 1
        self.drafted += len(parents)
        self.accepted += len(path)
        self.verified_path += len(path) + (1 if last in parents else 0)
        for counts, n in ((self.depth_rounds, depth), (self.depth_accepted, len(path))):
            counts.extend([0] * (depth - len(counts)))
            for d in range(n):
                counts[d] += 1

    @property
    def tau(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def path_acceptance_rate(self) -> float:
        return self.accepted / self.verified_path if self.verified_path else 0.0

    def to_proto(self) -> common_pb2.SpecStats:
        return common_pb2.SpecStats(
            rounds=self.rounds,
            drafted_tokens=self.drafted,
            accepted_tokens=self.accepted,
            mean_accepted_length=self.tau,
            acceptance_rate=self.acceptance_rate,
            routed_tokens=self.routed,
            router_calls=self.router_calls,
            catch_up_tokens=self.catch_up,
            verified_path_tokens=self.verified_path,
            path_acceptance_rate=self.path_acceptance_rate,
            rounds_by_depth=self.depth_rounds,
            accepted_by_depth=self.depth_accepted,
        )


def tree_depth(parents: list[int] | tuple[int, ...]) -> int:
    """Length of the longest root-to-node path of a tree given by parent indices (-1 = root)."""
    depth: list[int] = []
    for i, p in enumerate(parents):
        depth.append(1 if p < 0 else (depth[p] + 1 if p < i else 1))
    return max(depth, default=0)


class RecentAcceptance:
    """A running estimate of speculative path acceptance across this gateway's requests (an
    exponentially weighted mean, so it follows the traffic): policy auto's acceptance signal."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.value: float | None = None

    def add(self, stats: SpecCounter) -> None:
        """Fold in a finished speculative request (one that verified anything)."""
        if stats.verified_path:
            rate = stats.path_acceptance_rate
            self.value = rate if self.value is None else (1 - self.weight) * self.value + self.weight * rate

    def __call__(self) -> float | None:
        return self.value
