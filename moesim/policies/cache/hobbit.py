"""HOBBIT's multidimensional expert cache score."""

from __future__ import annotations

from typing import Literal

import numpy as np
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

    The per-key state lives in numpy arrays and a victim is chosen with a few vector operations
    over the pool (no Python loop over resident experts), with the same decisions as scanning the
    pool in recency order: scores are bit-identical and ties go to the least recently used.
    """

    class Config(CacheConfig):
        """HOBBIT: weights of recency, frequency, layer distance and precision in the score."""

        kind: Literal["hobbit"] = "hobbit"
        w_recency: float = Field(default=1.0, ge=0.0)
        w_frequency: float = Field(default=1.0, ge=0.0)
        w_layer: float = Field(default=1.0, ge=0.0)
        w_precision: float = Field(default=1.0, ge=0.0)

    def __init__(self, config, setup):
        n = setup.num_columns * setup.num_experts
        # state per key (column * E + expert) in numpy arrays, so that choosing a victim is a few
        # vector operations over the pool instead of a Python loop (large capacities)
        self._last = np.full(n, -1, dtype=np.int64)  # access clock of the last hit or insert
        self._uses = np.zeros(n, dtype=np.int64)  # accesses over the run
        self._prec = np.ones(n)  # precision score of the cached copy: 1 high, 0 low
        self._seq = np.zeros(n, dtype=np.int64)  # order of the last hit or insert (recency)
        self._in = np.zeros(n, dtype=bool)  # resident
        self._tick = 0
        self._prox: dict = {}  # current column -> proximity of every column
        self._now = 0
        self._col = 0
        super().__init__(config, setup)

    def access(self, column, experts, t, sizes=None):
        """Count the uses and note the clock and layer, then serve the access."""
        self._now = t
        self._col = column
        base = column * self.E
        for e in experts:
            self._uses[base + e] += 1
        return super().access(column, experts, t, sizes)

    def _candidates(self, pool: Pool, protect) -> np.ndarray:
        """Unprotected resident keys of ``pool`` (ascending key order)."""
        if self.config.scope == "per_layer":
            lo = pool.index * self.E
            mask = self._in[lo : lo + self.E].copy()
            off = lo
        else:
            mask = self._in.copy()
            off = 0
        if protect:
            p = np.fromiter(protect, dtype=np.int64, count=len(protect)) - off
            mask[p[(p >= 0) & (p < mask.size)]] = False
        return np.flatnonzero(mask) + off

    def _keep_scores(self, keys: np.ndarray) -> np.ndarray:
        """Keep-scores of ``keys``: the documented formula, with the same float operations in the
        same order as a scalar evaluation, so the values are bit-identical to it."""
        c = self.config
        uses = self._uses[keys]
        maxu = int(uses.max()) or 1
        prox = self._prox.get(self._col)
        if prox is None:
            L = self.setup.num_columns
            prox = self._prox[self._col] = np.array([layer_proximity(x, self._col, L) for x in range(L)])
        return (
            c.w_recency * (self._last[keys] + 1) / (self._now + 1)
            + c.w_frequency * uses / maxu
            + c.w_layer * prox[keys // self.E]
            + c.w_precision * self._prec[keys]
        )

    def scores(self, pool: Pool, protect) -> dict:
        """Keep-score of every unprotected resident key of ``pool``, least recent first."""
        keys = self._candidates(pool, protect)
        if len(keys) == 0:
            return {}
        keys = keys[np.argsort(self._seq[keys], kind="stable")]
        return dict(zip(keys.tolist(), self._keep_scores(keys).tolist()))

    def _touch(self, key: int, t: int) -> None:
        self._last[key] = t
        self._tick += 1
        self._seq[key] = self._tick

    def _on_hit(self, pool: Pool, key: int, t: int) -> None:
        self._touch(key, t)
        del pool.order[key]
        pool.order[key] = None

    def _on_insert(self, pool: Pool, key: int, t: int) -> None:
        self._touch(key, t)
        self._in[key] = True
        self._prec[key] = 1.0  # one precision per run in today's engine

    def _on_evict(self, pool: Pool, key: int) -> None:
        self._in[key] = False

    def _victim(self, pool: Pool, protect) -> int | None:
        """The lowest keep-score; among equal scores the least recently used."""
        keys = self._candidates(pool, protect)
        if len(keys) == 0:
            return None
        sc = self._keep_scores(keys)
        tied = keys[sc == sc.min()]
        return int(tied[np.argmin(self._seq[tied])])
