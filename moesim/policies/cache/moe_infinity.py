"""MoE-Infinity's activation-aware expert cache (request-level expert activation matrix)."""

from __future__ import annotations

from collections import deque
from typing import Literal

from pydantic import Field

from moesim.policies.cache.base import CacheConfig, RecencyScoredCache


class SlidingCounts:
    """Token counts per key over the last ``span`` access clocks (a sliding window).

    ``add(t, key, n)`` records ``n`` tokens of ``key`` at clock ``t``; ``expire(t)`` forgets those
    older than ``t - span + 1``. ``count[key]`` and ``layer_total[column]`` are the window sums.
    """

    def __init__(self, span: int, num_experts: int):
        self.span = span
        self.E = num_experts
        self.events: deque = deque()
        self.count: dict[int, int] = {}
        self.layer_total: dict[int, int] = {}

    def add(self, t: int, key: int, n: int) -> None:
        """Record ``n`` tokens routed to ``key`` at clock ``t``."""
        self.events.append((t, key, n))
        self.count[key] = self.count.get(key, 0) + n
        col = key // self.E
        self.layer_total[col] = self.layer_total.get(col, 0) + n

    def expire(self, t: int) -> None:
        """Drop what happened at clocks ``<= t - span``."""
        ev = self.events
        lo = t - self.span
        while ev and ev[0][0] <= lo:
            _, key, n = ev.popleft()
            c = self.count[key] - n
            if c:
                self.count[key] = c
            else:
                del self.count[key]
            self.layer_total[key // self.E] -= n


def layer_proximity(col: int, current: int, layers: int) -> float:
    """How soon layer ``col`` runs again after ``current`` has run, in (0, 1]: 1 for the next
    layer, ``1/layers`` for ``current`` itself (it runs again only in the next step)."""
    d = (col - current) % layers or layers  # accesses until the layer runs again
    return 1.0 - (d - 1) / layers


class MoeInfinity(RecencyScoredCache):
    """Activation-aware expert cache of MoE-Infinity (Xue et al. 2024, "MoE-Infinity: Efficient
    MoE Inference on Personal Machines with Sparsity-Aware Expert Cache", arXiv:2401.14361).

    MoE-Infinity keeps, per request, an expert activation matrix (EAM: tokens routed to each (layer,
    expert)) and evicts the expert with the lowest priority, computed from the current request's
    activation ratios and the layer's position relative to the layer being executed. Choices:

    * A run replays one request stream with no request boundaries, so the current request's EAM
      is the tokens of the last ``window_steps`` decode steps (a sliding window; 32 by default).
    * Priority = (tokens of the expert in the window / tokens of its layer in the window) x
      proximity, where proximity (when ``layer_aware``) is 1 for the layer that runs next and
      falls linearly to ``1/L`` for the layer just executed: experts of layers still ahead in the
      current iteration are kept. An expert absent from the window has priority 0.
    * The victim is the lowest priority, ties to the least recently used; counting happens before
      the step's cache decision.
    """

    class Config(CacheConfig):
        """MoE-Infinity: ``window_steps`` = decode steps that form the current 'request'."""

        kind: Literal["moe_infinity"] = "moe_infinity"
        window_steps: int = Field(default=32, ge=1, description="decode steps in the activation window")
        layer_aware: bool = Field(default=True, description="weight priorities by how soon the layer runs")

    def __init__(self, config, setup):
        self.window = SlidingCounts(config.window_steps * setup.num_columns, setup.num_experts)
        self._col = 0
        super().__init__(config, setup)

    def _tokens(self, column: int, experts, t: int) -> list:
        s = self.setup
        if s.plan is None:
            return [1] * len(experts)
        ex, cnt = s.future_row(t // s.num_columns, column)
        by = dict(zip(ex, cnt))
        return [by.get(e, 1) for e in experts]

    def access(self, column, experts, t, sizes=None):
        """Add the step's tokens to the window, then serve the access."""
        self._col = column
        w = self.window
        w.expire(t)
        base = column * self.E
        for e, n in zip(experts, self._tokens(column, experts, t)):
            w.add(t, base + e, n)
        return super().access(column, experts, t, sizes)

    def priority(self, key: int) -> float:
        """Keep-priority of ``key`` now (higher = keep)."""
        w = self.window
        col = key // self.E
        tot = w.layer_total.get(col, 0)
        ratio = w.count.get(key, 0) / tot if tot else 0.0
        if self.config.layer_aware:
            ratio *= layer_proximity(col, self._col, self.setup.num_columns)
        return ratio


    def _score(self, key: int) -> float:
        return self.priority(key)
