"""Least-frequently-used expert cache."""

from __future__ import annotations

from typing import Literal

from moesim.policies.cache.base import CacheConfig, CachePolicy, Pool


class Lfu(CachePolicy):
    """Least-frequently-used eviction (the frequency-based baseline of the caching literature, e.g.
    as analysed by Lee et al. 2001, "LRFU: a spectrum of policies that subsumes the least recently
    used and least frequently used policies", IEEE Trans. Computers 50(12); used for experts by
    several MoE offloading systems as a baseline).

    Choices the definition leaves open:

    * ``frequency: global`` (default) counts every access to an expert over the whole run, also
      while it was not resident, so an evicted expert that returns keeps its history;
      ``frequency: resident`` counts only since the expert last entered the cache (the count is
      dropped on eviction, as in the textbook in-cache LFU).
    * Every access counts one use (streamed misses too, in ``global``); a warm-started expert
      starts at 0.
    * Ties on frequency go to the least recently used expert (a hit or an insert makes an expert
      most recent; within one step in the order of the accounting: hits, then misses).
    """

    class Config(CacheConfig):
        """LFU: ``frequency`` = global (whole-run history) or resident (since insertion)."""

        kind: Literal["lfu"] = "lfu"
        frequency: Literal["global", "resident"] = "global"

    def __init__(self, config, setup):
        self.freq: dict[int, int] = {}
        self.last: dict[int, int] = {}  # recency stamp (monotone counter)
        self._clock = 0
        super().__init__(config, setup)

    def _stamp(self, key: int) -> None:
        self._clock += 1
        self.last[key] = self._clock

    def access(self, column, experts, t, sizes=None):
        """Count the uses (``frequency: global`` counts every access, streamed ones too), then serve
        the access as the base class does."""
        if self.config.frequency == "global":
            base = column * self.E
            freq = self.freq
            for e in experts:
                freq[base + e] = freq.get(base + e, 0) + 1
        return super().access(column, experts, t, sizes)

    def _on_hit(self, pool: Pool, key: int, t: int) -> None:
        if self.config.frequency == "resident":
            self.freq[key] += 1
        self._stamp(key)

    def _on_insert(self, pool: Pool, key: int, t: int) -> None:
        if self.config.frequency == "resident":
            self.freq[key] = 0 if t < 0 else 1  # t < 0: warm start, not an access
        else:
            self.freq.setdefault(key, 0)
        self._stamp(key)

    def _on_evict(self, pool: Pool, key: int) -> None:
        if self.config.frequency == "resident":
            del self.freq[key]

    def _victim(self, pool: Pool, protect) -> int | None:
        best = None
        best_k = None
        freq, last = self.freq, self.last
        for key in pool.order:
            if key in protect:
                continue
            k = (freq[key], last[key])
            if best_k is None or k < best_k:
                best, best_k = key, k
        return best
