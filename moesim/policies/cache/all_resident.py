"""Every expert resident in GPU memory: no loads at all (the upper bound of any cache)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moesim.policies.base import PolicyConfig
from moesim.policies.cache.base import CachePolicy, Pool


class AllResident(CachePolicy):
    """All experts of all MoE layers live in GPU memory from the start; every access is a hit.
    The memory check refuses it when the model does not fit.

    ``cpu_moe_layers: N`` keeps the experts of the first N MoE layers in host memory instead (the
    static layout of llama.cpp's ``--n-cpu-moe N``): pair it with an execution policy that runs
    non-resident experts on the CPU (``llamacpp``); on the GPU path they would be streamed through
    one transient buffer. The engine builder may instead name the columns whose experts stay in
    host memory (``host_columns``: llama.cpp's ``-ot`` patterns and ``-ngl`` CPU blocks, see
    :mod:`moesim.policies.execution.llamacpp`), any set of them, which then replaces the first N."""

    class Config(PolicyConfig):
        """All experts resident, except those of the first ``cpu_moe_layers`` MoE layers."""

        kind: Literal["all_resident"] = "all_resident"
        cpu_moe_layers: int = Field(default=0, ge=0)

    def __init__(self, config, setup, host_columns=None):
        # columns (MoE layers in model order) whose experts live in host memory
        n = setup.num_columns
        self.host_columns = (frozenset(range(min(config.cpu_moe_layers, n))) if host_columns is None
                             else frozenset(host_columns))
        super().__init__(config, setup)

    def slots_total(self) -> int:
        return (self.setup.num_columns - len(self.host_columns)) * self.E

    def transient_buffer_count(self) -> int:
        return 1 if self.host_columns else 0

    def _build_pools(self) -> None:
        E = self.E
        keys = [c * E + e for c in range(self.setup.num_columns) if c not in self.host_columns for e in range(E)]
        if self.setup.key_bytes is None:
            pool = Pool(0, len(keys) * self.expert_bytes)
        else:  # heterogeneous experts: exactly the bytes of the resident ones
            pool = Pool(0, sum(self.size_of(k) for k in keys))
        self.pools = [pool]
        self.pool_of_column = [pool] * self.setup.num_columns
        for key in keys:
            self._insert(pool, key, -1)

    def _on_hit(self, pool: Pool, key: int, t: int) -> None:
        pass

    def _on_insert(self, pool: Pool, key: int, t: int) -> None:
        pass

    def _victim(self, pool: Pool, protect):  # pragma: no cover - never full on a miss
        return None
