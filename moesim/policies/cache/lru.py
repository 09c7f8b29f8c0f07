"""Least-recently-used expert cache."""

from __future__ import annotations

from typing import Literal

from moesim.policies.cache.base import CacheConfig, RecencyScoredCache


class Lru(RecencyScoredCache):
    """Least-recently-used eviction (the baseline of Mixtral-offloading, Eliseev & Mazur 2023,
    arXiv:2312.17238, which keeps a per-layer LRU of experts on the GPU).

    Recency is kept by the insertion order of each pool's ordered dict: a hit or an insert moves the
    key to the most-recent end; the victim is the least recent key that the step does not need.
    """

    class Config(CacheConfig):
        """LRU: capacity in expert slots or GiB, global or per-layer pools."""

        kind: Literal["lru"] = "lru"

    _score_floor = 0  # every key scores 0: the least recent unprotected key goes

    def _score(self, key: int) -> int:
        return 0
