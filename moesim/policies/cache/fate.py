"""Fate's shallow-favouring expert cache: per-layer quotas that shrink with depth."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from moesim.errors import InputError
from moesim.policies.cache.arc import Arc
from moesim.policies.cache.base import CacheConfig, Pool


def fate_quotas(total: int, layers: int, experts: int, top_k: int, ratio: float) -> list[int]:
    """Expert slots of each MoE layer (shallowest first) from ``total`` slots.

    Every layer first gets ``top_k`` slots (a step's experts must fit); the rest is split in
    proportion to weights falling linearly from ``ratio`` (first MoE layer) to 1 (last), rounded
    down, with the leftover slots going one each to the shallowest layers. A layer never gets more
    than ``experts`` slots; its surplus goes to the shallowest layer with room. The quotas are
    non-increasing with depth and sum to ``min(total, layers * experts)``.
    """
    if layers < 1:
        return []
    q = [top_k] * layers
    rest = total - top_k * layers
    if rest < 0:
        raise ValueError("fewer slots than top_k per layer")
    if layers == 1:
        w = [1.0]
    else:
        w = [ratio - (ratio - 1.0) * i / (layers - 1) for i in range(layers)]
    sw = sum(w)
    add = [math.floor(rest * x / sw) for x in w]
    # floating error could push a floor above its exact value's: keep the sum within rest
    while sum(add) > rest:
        i = max(i for i in range(layers) if add[i] > 0)
        add[i] -= 1
    left = rest - sum(add)
    for i in range(left):
        add[i % layers] += 1
    q = [a + b for a, b in zip(q, add)]
    over = sum(max(0, x - experts) for x in q)
    q = [min(x, experts) for x in q]
    for i in range(layers):
        if over <= 0:
            break
        room = experts - q[i]
        give = min(room, over)
        q[i] += give
        over -= give
    return q


class Fate(Arc):
    """Shallow-favouring expert cache of Fate (Fang et al. 2025, "Fate: Fast Edge Inference of
    Mixture-of-Experts Models via Cross-Layer Gate", arXiv:2502.12224).

    Fate gives shallow MoE layers a larger share of the cache (its cross-layer prefetch predicts
    them worst) and evicts with ARC inside the cache. Choices where the paper is open:

    * The budget (``capacity_experts`` or ``capacity_gib``: total slots, as for every cache) is
      always split into one pool per MoE layer, whatever ``scope`` says; see :func:`fate_quotas`
      for the rule: ``top_k`` slots per layer, the rest in proportion to weights falling linearly
      from ``shallow_ratio`` (first MoE layer) to 1 (last), never more than the layer's experts.
      Fewer than ``top_k`` slots per layer is an input error.
    * ``within_layer``: ``arc`` (default, as the paper) runs one ARC per layer pool (see
      :class:`~moesim.policies.cache.arc.Arc`); ``lru`` uses plain LRU inside each layer.
    * ``warm_start: first`` fills each layer's pool with its lowest-numbered experts.
    """

    class Config(CacheConfig):
        """Fate: per-layer quotas, ``shallow_ratio`` = first layer's weight over the last's."""

        kind: Literal["fate"] = "fate"
        shallow_ratio: float = Field(default=2.0, ge=1.0, description="quota weight of the first MoE layer vs the last")
        within_layer: Literal["arc", "lru"] = "arc"

    def quotas(self) -> list[int]:
        """Expert slots of each column's pool (shallowest first)."""
        return [p.capacity_bytes // self.expert_bytes for p in self.pools]

    def _build_pools(self) -> None:
        s = self.setup
        total = self.slots_total()
        L = s.num_columns
        if total < s.top_k * L:
            fld = "policies.cache." + (
                "capacity_experts" if self.config.capacity_experts is not None else "capacity_gib"
            )
            raise InputError(
                f"{total} slots over {L} layers leave fewer than top_k={s.top_k} per layer; "
                f"need at least {s.top_k * L}",
                source=s.source,
                field=fld,
            )
        q = fate_quotas(total, L, self.E, s.top_k, self.config.shallow_ratio)
        self.pools = [Pool(i, n * self.expert_bytes) for i, n in enumerate(q)]
        self.pool_of_column = list(self.pools)
        self._warm_start()

    def _warm_start(self) -> None:
        if self.config.warm_start == "first":
            for col, pool in enumerate(self.pools):
                for e in range(min(self.E, pool.capacity_bytes // self.expert_bytes)):
                    self._insert(pool, col * self.E + e, -1)
            return
        super()._warm_start()

    # ---- within-layer eviction: ARC (inherited) or LRU ----------------------------------------
    def _lru(self) -> bool:
        return self.config.within_layer == "lru"

    def admit(self, pool: Pool, key: int, t: int) -> bool:
        return True if self._lru() else super().admit(pool, key, t)

    def _on_hit(self, pool: Pool, key: int, t: int) -> None:
        if self._lru():
            del pool.order[key]
            pool.order[key] = None
        else:
            super()._on_hit(pool, key, t)

    def _on_insert(self, pool: Pool, key: int, t: int) -> None:
        if not self._lru():
            super()._on_insert(pool, key, t)

    def _victim(self, pool: Pool, protect) -> int | None:
        if self._lru():
            return self._oldest(pool.order, protect)
        return super()._victim(pool, protect)

    def _on_evict(self, pool: Pool, key: int) -> None:
        if not self._lru():
            super()._on_evict(pool, key)
