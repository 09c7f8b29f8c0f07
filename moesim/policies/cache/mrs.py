"""HybriMoE's minus-recent-score (MRS) expert cache."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moesim.policies.cache.base import CacheConfig, RecencyScoredCache


class HybriMoeMrs(RecencyScoredCache):
    """Minus Recent Score replacement of HybriMoE (Zhong et al. 2025, "HybriMoE: Hybrid CPU-GPU
    Scheduling and Cache Management for Efficient MoE Inference", arXiv:2504.05897, DAC 2025).

    Each expert carries a score ``S``; every time its layer runs, ``S <- a * s + (1 - a) * S`` where
    ``s`` is the expert's router score in that step (0 when it was not selected), and the victim is
    the resident expert with the lowest ``S``. Choices where the paper is open:

    * ``s`` is the expert's gate weight from the trace summed over the step's tokens and divided by
      the batch size (the mean over tokens, so scores of all layers share one scale in a global
      pool); a trace without gate weights counts each routed token as 1.
    * ``top_p``: only the experts whose scores, taken largest first, are needed to reach this
      fraction of the step's total score keep their ``s``; the rest get ``s = 0`` (1.0 = every
      routed expert, the default; the paper applies the update over the top-p router scores).
    * Scores start at 0 (warm-started experts too) and are updated before the step's cache
      decision, so the step's own experts are already credited.
    * Ties on ``S`` go to the least recently used expert.
    * Without the trace's expert array (unit use) every routed expert gets ``s = 1``.
    """

    class Config(CacheConfig):
        """HybriMoE MRS: ``alpha`` = weight of the newest score, ``top_p`` = score mass kept."""

        kind: Literal["hybrimoe_mrs"] = "hybrimoe_mrs"
        alpha: float = Field(default=0.5, gt=0.0, le=1.0, description="a in S <- a*s + (1-a)*S")
        top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="router-score mass that is credited")

    def __init__(self, config, setup):
        self.score: dict[int, float] = {}
        super().__init__(config, setup)

    def step_scores(self, column: int, experts, t: int) -> dict:
        """Router score ``s`` of each credited expert of (step, ``column``) (others get 0)."""
        s = self.setup
        if s.experts is None:
            raw = {e: 1.0 for e in experts}
        else:
            step = t // s.num_columns
            raw = {e: w / s.batch_size for e, w in s.gate_mass(step, column).items()}
        top_p = self.config.top_p
        if top_p >= 1.0:
            return raw
        total = sum(raw.values())
        kept: dict = {}
        acc = 0.0
        for e, w in sorted(raw.items(), key=lambda kv: (-kv[1], kv[0])):
            if acc >= top_p * total:
                break
            kept[e] = w
            acc += w
        return kept

    def access(self, column, experts, t, sizes=None):
        """Update the layer's scores with this step's router scores, then serve the access."""
        a = self.config.alpha
        b = 1.0 - a
        base = column * self.E
        sc = self.score
        new = self.step_scores(column, experts, t)
        for e in range(self.E):
            k = base + e
            sc[k] = a * new.get(e, 0.0) + b * sc.get(k, 0.0)
        return super().access(column, experts, t, sizes)


    def _score(self, key: int) -> float:
        return self.score.get(key, 0.0)
