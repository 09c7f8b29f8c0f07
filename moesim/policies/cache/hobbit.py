"""HOBBIT's multidimensional expert cache score."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moesim.policies.cache.base import CacheConfig, CachePolicy, Pool
from moesim.policies.cache.moe_infinity import layer_proximity


class Hobbit(CachePolicy):
    """Sequence-level multidimensional expert caching of HOBBIT (Tang et al. 2024, "HOBBIT: A Mixed
    Precision Expert Offloading System for Fast MoE Inference", arXiv:2411.01433).

    HOBBIT scores each cached expert on several dimensions at once — how recently and how often it
    was used, whether its copy is high precision, and how far its layer is from the layer being
    executed — and evicts the lowest score. Here, with every dimension in [0, 1] (higher = keep)::

        keep = w_recency * (last_use + 1) / (now + 1)
             + w_frequency * uses / (most uses among the candidates)
             + w_layer * proximity          # 1 for the next layer to run ... 1/L for the current
             + w_precision * precision      # 1 high precision, 0 low precision

    Choices where the paper is open: the normalisations above (``last_use`` and ``now`` are access
    clocks, a warm-started expert has ``last_use = -1``; ``uses`` counts every access over the run,
    the run being one sequence); layer distance counts MoE layers forward, wrapping into the next
    step, and is constant inside a per-layer pool; equal default weights; ties go to the least
    recently used. The engine has a single precision per run today, so every cached copy scores
    ``precision = 1`` and ``w_precision`` shifts all scores alike (the field is kept for when mixed
    precision copies share a pool).
    """

    class Config(CacheConfig):
        """HOBBIT: weights of recency, frequency, layer distance and precision in the score."""

        kind: Literal["hobbit"] = "hobbit"
        w_recency: float = Field(default=1.0, ge=0.0)
        w_frequency: float = Field(default=1.0, ge=0.0)
        w_layer: float = Field(default=1.0, ge=0.0)
        w_precision: float = Field(default=1.0, ge=0.0)

    def __init__(self, config, setup):
        self.last: dict[int, int] = {}
        self.uses: dict[int, int] = {}
        self.precision: dict[int, float] = {}
        self._now = 0
        self._col = 0
        super().__init__(config, setup)

    def access(self, column, experts, t, sizes=None):
        """Count the uses and note the clock and layer, then serve the access."""
        self._now = t
        self._col = column
        base = column * self.E
        u = self.uses
        for e in experts:
            u[base + e] = u.get(base + e, 0) + 1
        return super().access(column, experts, t, sizes)

    def scores(self, pool: Pool, protect) -> dict:
        """Keep-score of every unprotected resident key of ``pool``."""
        c = self.config
        cands = [k for k in pool.order if k not in protect]
        if not cands:
            return {}
        maxu = max(self.uses.get(k, 0) for k in cands) or 1
        now1 = self._now + 1
        L = self.setup.num_columns
        out = {}
        for k in cands:
            out[k] = (
                c.w_recency * (self.last.get(k, -1) + 1) / now1
                + c.w_frequency * self.uses.get(k, 0) / maxu
                + c.w_layer * layer_proximity(k // self.E, self._col, L)
                + c.w_precision * self.precision.get(k, 1.0)
            )
        return out

    def _on_hit(self, pool: Pool, key: int, t: int) -> None:
        self.last[key] = t
        del pool.order[key]
        pool.order[key] = None

    def _on_insert(self, pool: Pool, key: int, t: int) -> None:
        self.last[key] = t
        self.precision[key] = 1.0  # one precision per run in today's engine

    def _victim(self, pool: Pool, protect) -> int | None:
        best = None
        best_s = None
        for k, s in self.scores(pool, protect).items():  # least recent first; strict < on ties
            if best_s is None or s < best_s:
                best, best_s = k, s
        return best
