"""Speculative statistics of one request (DESIGN.md section 7).

* rounds: target verification rounds (one target forward each);
* drafted_tokens: tree nodes the draft proposed, over all rounds;
* accepted_tokens: drafted tokens the target accepted;
* mean_accepted_length (tau): tokens each verification round produced, counting the
  correction/bonus token: (accepted_tokens + rounds) / rounds; 1.0 for plain decoding. Counted
  before stop truncation, so it measures the draft, not where the request happened to end;
* acceptance_rate: accepted_tokens / drafted_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from specmesh.v1 import common_pb2


@dataclass
class SpecCounter:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    routed: int = 0

    def add_round(self, drafted: int, accepted: int) -> None:
        if accepted > drafted or drafted < 0 or accepted < 0:
            raise ValueError(f"a round cannot accept {accepted} of {drafted} drafted tokens")
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted

    @property
    def tau(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_proto(self) -> common_pb2.SpecStats:
        return common_pb2.SpecStats(
            rounds=self.rounds,
            drafted_tokens=self.drafted,
            accepted_tokens=self.accepted,
            mean_accepted_length=self.tau,
            acceptance_rate=self.acceptance_rate,
            routed_tokens=self.routed,
        )


def tree_depth(parents: list[int] | tuple[int, ...]) -> int:
    """Length of the longest root-to-node path of a tree given by parent indices (-1 = root)."""
    depth: list[int] = []
    for i, p in enumerate(parents):
        depth.append(1 if p < 0 else (depth[p] + 1 if p < i else 1))
    return max(depth, default=0)
