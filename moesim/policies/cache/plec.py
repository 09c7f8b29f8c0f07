"""ExpertFlow's predictive locality-aware expert cache (PLEC)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moesim.policies.cache.base import CacheConfig, RecencyScoredCache
from moesim.policies.cache.belady import NextUse
from moesim.policies.cache.moe_infinity import SlidingCounts


class ExpertFlowPlec(RecencyScoredCache):
    """Predictive Locality-aware Expert Caching of ExpertFlow (He et al. 2024, "ExpertFlow:
    Optimized Expert Activation and Token Allocation for Efficient Mixture-of-Experts Inference",
    arXiv:2410.17954).

    ExpertFlow's routing-path predictor estimates, in one pass, which experts each token will use
    in every MoE layer; PLEC keeps the predicted experts and otherwise the ones with the most recent
    activity (locality), evicting the rest. The paper's text does not pin the eviction rule down to
    the level a simulator needs, so this is what moesim does:

    * Prediction: the path predictor is replaced by an oracle (``predictor: oracle``) that knows
      the experts of the remaining layers of the current decode step and of the next
      ``lookahead_steps`` steps (0 by default: the current token's path, which is what one pass of
      the predictor gives). ``predictor: none`` turns prediction off (locality only). A
      mispredicting predictor belongs to the prefetch family's accuracy oracle, not here.
    * Locality: tokens routed to the expert over the last ``window_steps`` decode steps.
    * Victim: an unpredicted expert before a predicted one; then the lowest locality count; then
      the least recently used.
    """

    class Config(CacheConfig):
        """ExpertFlow PLEC: oracle path prediction plus a sliding locality window."""

        kind: Literal["expertflow_plec"] = "expertflow_plec"
        predictor: Literal["oracle", "none"] = "oracle"
        lookahead_steps: int = Field(default=0, ge=0, description="whole decode steps predicted beyond the current one")
        window_steps: int = Field(default=16, ge=1, description="decode steps in the locality window")

    def __init__(self, config, setup):
        self.future = NextUse(setup) if config.predictor == "oracle" else None
        self.window = SlidingCounts(config.window_steps * setup.num_columns, setup.num_experts)
        self._now = 0
        super().__init__(config, setup)

    def access(self, column, experts, t, sizes=None):
        """Add the step's activations to the locality window, then serve the access."""
        self._now = t
        w = self.window
        w.expire(t)
        base = column * self.E
        s = self.setup
        counts = dict(zip(*s.future_row(t // s.num_columns, column))) if s.plan is not None else {}
        for e in experts:
            w.add(t, base + e, counts.get(e, 1))
        return super().access(column, experts, t, sizes)

    def predicted(self, key: int) -> bool:
        """Whether the path oracle says ``key`` is needed before the prediction horizon."""
        if self.future is None:
            return False
        L = self.setup.num_columns
        horizon = (self._now // L + 1 + self.config.lookahead_steps) * L
        return self.future.next_after(key, self._now) < horizon


    _score_floor = (False, 0)  # unpredicted and idle in the window

    def _score(self, key: int) -> tuple:
        return (self.predicted(key), self.window.count.get(key, 0))
