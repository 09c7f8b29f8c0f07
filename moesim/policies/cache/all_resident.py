"""Every expert resident in GPU memory: no loads at all (the upper bound of any cache)."""

from __future__ import annotations

from typing import Literal

from moesim.policies.base import PolicyConfig
from moesim.policies.cache.base import CachePolicy, Pool


class AllResident(CachePolicy):
    """All experts of all MoE layers live in GPU memory from the start; every access is a hit.
    The memory check refuses it when the model does not fit."""

    class Config(PolicyConfig):
        """All experts resident (no capacity to set)."""

        kind: Literal["all_resident"] = "all_resident"

    def slots_total(self) -> int:
        return self.setup.num_columns * self.E

    def _build_pools(self) -> None:
        total = self.slots_total()
        pool = Pool(0, total * self.expert_bytes)
        self.pools = [pool]
        self.pool_of_column = [pool] * self.setup.num_columns
        for key in range(total):
            self._insert(pool, key, -1)

    def _on_hit(self, pool: Pool, key: int, t: int) -> None:
        pass

    def _on_insert(self, pool: Pool, key: int, t: int) -> None:
        pass

    def _victim(self, pool: Pool, protect):  # pragma: no cover - never full on a miss
        return None
