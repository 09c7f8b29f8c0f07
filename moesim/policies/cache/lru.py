"""Least-recently-used expert cache."""

from __future__ import annotations

from typing import Literal

from moesim.policies.cache.base import CacheConfig, CachePolicy, Pool


class Lru(CachePolicy):
    """Least-recently-used eviction (the baseline of Mixtral-offloading, Eliseev & Mazur 2023,
    arXiv:2312.17238, which keeps a per-layer LRU of experts on the GPU).

    Recency is kept by the insertion order of each pool's ordered dict: a hit or an insert moves the
    key to the most-recent end; the victim is the least recent key that the step does not need.
    """

    class Config(CacheConfig):
        """LRU: capacity in expert slots or GiB, global or per-layer pools."""

        kind: Literal["lru"] = "lru"

    def _on_hit(self, pool: Pool, key: int, t: int) -> None:
        order = pool.order
        del order[key]
        order[key] = None

    def _on_insert(self, pool: Pool, key: int, t: int) -> None:
        pass  # _insert already appended it at the most-recent end

    def _victim(self, pool: Pool, protect) -> int | None:
        for key in pool.order:
            if key not in protect:
                return key
        return None
