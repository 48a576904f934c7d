"""Which rounds of one sender the LossNetServer has applied: a set kept as merged ``[lo, hi)`` intervals.

Ray's async actor calls do not keep their order, so "round ≤ the highest applied" is no replay test: a late
round would be dropped. The set answers exactly; its size is the number of gaps (rounds refused, or still in
flight), not of rounds. Memory is bounded: past ``max_intervals`` the oldest gap is closed (those rounds,
far older than anything in flight, then count as seen). It round-trips through a list of pairs, so it is
saved with every version and a restarted server still recognises true replays.
"""
from __future__ import annotations

from bisect import bisect_right

MAX_INTERVALS = 256


class AppliedRounds:
    def __init__(self, intervals: list[list[int]] | None = None, max_intervals: int = MAX_INTERVALS):
        self.iv: list[list[int]] = [[int(lo), int(hi)] for lo, hi in (intervals or [])]
        self.max_intervals = max_intervals

    @classmethod
    def up_to(cls, last: int) -> "AppliedRounds":
        """Every round 0..``last`` (what a state saved with only a sender's last round means)."""
        return cls([[0, int(last) + 1]] if last >= 0 else [])

    def __contains__(self, r: int) -> bool:
        i = bisect_right(self.iv, [r, float("inf")]) - 1
        return i >= 0 and self.iv[i][0] <= r < self.iv[i][1]

    def add(self, r: int) -> None:
        r = int(r)
        if r in self:
            return
        i = bisect_right(self.iv, [r, float("inf")])  # first interval starting after r
        joins_left = i > 0 and self.iv[i - 1][1] == r
        joins_right = i < len(self.iv) and self.iv[i][0] == r + 1
        if joins_left and joins_right:
            self.iv[i - 1][1] = self.iv[i][1]
            del self.iv[i]
        elif joins_left:
            self.iv[i - 1][1] = r + 1
        elif joins_right:
            self.iv[i][0] = r
        else:
            self.iv.insert(i, [r, r + 1])
        if len(self.iv) > self.max_intervals:  # close the oldest gap
            self.iv[0:2] = [[self.iv[0][0], self.iv[1][1]]]

    @property
    def last(self) -> int:
        return self.iv[-1][1] - 1 if self.iv else -1

    def to_list(self) -> list[list[int]]:
        return [list(x) for x in self.iv]
