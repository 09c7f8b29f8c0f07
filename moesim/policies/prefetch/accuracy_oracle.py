"""Cross-layer gate look-ahead with a set accuracy (an oracle with controlled errors)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from moesim.policies.base import PolicyConfig
from moesim.policies.prefetch.base import PrefetchPolicy


class AccuracyOracle(PrefetchPolicy):
    """Next-layer prediction of a chosen accuracy, the knob studied by Pre-gated MoE (Hwang et al.,
    ISCA 2024), AdapMoE (Zhong et al., 2024) and Fate (2025, arXiv:2502.12224): each expert layer
    l+1 really uses is predicted with probability ``accuracy``; otherwise it is replaced by the most
    popular expert of layer l+1 (over the whole trace) that the step does not use, so a wrong guess
    costs a real, useless copy. Seeded from the scenario seed (``numpy.random.SeedSequence``).
    At accuracy 1 it equals ``oracle_next_layer``; at 0 every prefetch is wasted."""

    is_oracle = True

    class Config(PolicyConfig):
        """Prediction accuracy in [0, 1] for the next MoE layer."""

        kind: Literal["accuracy_oracle"] = "accuracy_oracle"
        accuracy: float = Field(default=0.8, ge=0.0, le=1.0)

    def __init__(self, config, setup):
        super().__init__(config, setup)
        self.rng = np.random.default_rng(np.random.SeedSequence([setup.seed, 0x5EED]))
        ex = setup.experts
        E = setup.num_experts
        self.by_popularity = []
        for c in range(setup.num_columns):
            col = ex[:, setup.col_src[c]].reshape(-1)
            counts = np.bincount(col[col >= 0].astype(np.int64), minlength=E)
            self.by_popularity.append([int(e) for e in np.argsort(-counts, kind="stable")])

    def plan(self, step, column, known):
        su = self.setup
        c2 = column + 1
        if c2 >= su.num_columns:
            return []
        true = su.true_row(step, c2)
        hits = self.rng.random(len(true)) < self.config.accuracy
        used = set(true)
        chosen = []
        spare = (e for e in self.by_popularity[c2] if e not in used)
        for e, ok in zip(true, hits):
            if ok:
                chosen.append(e)
            else:
                wrong = next(spare, None)
                if wrong is not None:
                    chosen.append(wrong)
        return [(c2, e) for e in chosen]
