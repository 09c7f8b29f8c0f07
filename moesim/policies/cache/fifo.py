"""First-in, first-out expert cache."""

from __future__ import annotations

from typing import Literal

from moesim.policies.cache.base import CacheConfig, CachePolicy, Pool


class Fifo(CachePolicy):
    """First-in, first-out eviction (Belady 1966, "A study of replacement algorithms for a
    virtual-storage computer", IBM Systems Journal 5(2); the classic baseline of the paging
    literature).

    The victim is the resident expert that entered its pool earliest, skipping experts the current
    step needs; a hit does not change the order. Warm-started experts enter in the warm-start
    order (the first listed is the oldest). Nothing is left open by the definition.
    """

    class Config(CacheConfig):
        """FIFO: capacity in expert slots or GiB, global or per-layer pools."""

        kind: Literal["fifo"] = "fifo"

    def _on_hit(self, pool: Pool, key: int, t: int) -> None:
        pass  # arrival order only

    def _on_insert(self, pool: Pool, key: int, t: int) -> None:
        pass  # _insert appended the key at the newest end of pool.order

    def _victim(self, pool: Pool, protect) -> int | None:
        for key in pool.order:
            if key not in protect:
                return key
        return None
