"""Pure streaming: nothing is cached; every routed expert is loaded at every use."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moesim.policies.base import PolicyConfig
from moesim.policies.cache.base import CachePolicy, Pool


class Streaming(CachePolicy):
    """No expert cache: each (step, layer, expert) is copied into one of ``transient_buffers`` GPU
    buffers, used and dropped (the layer-streaming baseline of ZeRO-Inference / FlexGen-style
    offloading, applied to experts). Every access is a miss; nothing is ever evicted."""

    class Config(PolicyConfig):
        """Streaming through a ring of transient buffers (2 = double buffering)."""

        kind: Literal["streaming"] = "streaming"
        transient_buffers: int = Field(default=2, ge=1)

    def slots_total(self) -> int:
        return 0

    def _build_pools(self) -> None:
        from moesim.policies.cache.base import Pool as _Pool

        pool = _Pool(0, 0)
        self.pools = [pool]
        self.pool_of_column = [pool] * self.setup.num_columns

    def admit(self, pool: Pool, key: int, t: int) -> bool:
        return False

    def _on_hit(self, pool, key, t):  # pragma: no cover - nothing is ever resident
        raise AssertionError("streaming cache has no resident experts")

    def _on_insert(self, pool, key, t):  # pragma: no cover
        raise AssertionError("streaming cache never inserts")

    def _victim(self, pool, protect):  # pragma: no cover
        return None
