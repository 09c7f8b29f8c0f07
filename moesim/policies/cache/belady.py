"""Belady's offline-optimal expert cache (evict the expert needed farthest in the future)."""

from __future__ import annotations

from typing import Literal

from moesim.errors import InputError
from moesim.policies.cache.base import CacheConfig, CacheSetup, RecencyScoredCache

NEVER = float("inf")


class NextUse:
    """Access times of every key over a run's whole plan, for next-use look-ups.

    ``times[key]`` lists the access clocks ``t = step * num_columns + column`` at which ``key``
    (``column * num_experts + expert``) is needed, ascending; a per-key cursor only moves forward,
    so a run of look-ups at non-decreasing ``t`` costs amortised O(1) each.
    """

    def __init__(self, setup: CacheSetup):
        if setup.plan is None:
            raise InputError(
                "needs the run's decode plan (the future of the trace)", source=setup.source, field="policies.cache.kind"
            )
        plan = setup.plan
        C, E = setup.num_columns, setup.num_experts
        times: dict[int, list] = {}
        t = 0
        for step in range(plan.steps):
            for c in range(C):
                base = c * E
                for e in setup.future_row(step, c)[0]:
                    lst = times.get(base + e)
                    if lst is None:
                        times[base + e] = [t]
                    else:
                        lst.append(t)
                t += 1
        self.times = times
        self.cursor: dict[int, int] = {}

    def next_after(self, key: int, t: int) -> float:
        """The first access clock ``>= t`` that needs ``key`` (``inf`` when never again)."""
        lst = self.times.get(key)
        if lst is None:
            return NEVER
        i = self.cursor.get(key, 0)
        n = len(lst)
        while i < n and lst[i] < t:
            i += 1
        self.cursor[key] = i
        return lst[i] if i < n else NEVER


class Belady(RecencyScoredCache):
    """Belady's MIN (Belady 1966, "A study of replacement algorithms for a virtual-storage
    computer", IBM Systems Journal 5(2)): on a miss evict the resident expert whose next use is
    farthest in the future. It reads the whole decode plan, so it is an offline bound, not a
    system: with equal expert sizes no online policy gets more hits at the same capacity.

    Choices: the future is the run's plan as the engine replays it (``CacheSetup.plan``, looped
    rows included); an expert never needed again is farthest of all; experts the current step
    needs are never evicted; ties on the next use (several experts of one later (step, layer), or
    several never needed again) go to the least recently used. It always admits the missed expert
    (no bypass), as in the classic MIN.
    """

    class Config(CacheConfig):
        """Belady (offline optimal): capacity in expert slots or GiB, global or per-layer."""

        kind: Literal["belady"] = "belady"

    def __init__(self, config, setup):
        self.future = NextUse(setup)
        self._now = 0
        super().__init__(config, setup)

    def access(self, column, experts, t, sizes=None):
        """Serve one (step, layer) at access clock ``t`` (also the reference for next uses)."""
        self._now = t
        return super().access(column, experts, t, sizes)


    _score_floor = -NEVER  # never used again: nothing is a better victim

    def _score(self, key: int) -> float:
        return -self.future.next_after(key, self._now)  # farthest next use first
