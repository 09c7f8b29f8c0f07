"""Cross-layer expert prediction with a set accuracy (an oracle with controlled errors)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from moesim.policies.base import PolicyConfig
from moesim.policies.prefetch.base import PrefetchPolicy


class AccuracyOracle(PrefetchPolicy):
    """Expert prediction of a chosen accuracy, the knob that separates look-ahead systems:
    Pre-gated MoE (Hwang et al., ISCA 2024) and AdapMoE (Zhong et al., 2024) predict the next layer
    from the current one; ProMoE (Song et al., 2024, arXiv:2410.22134) predicts from intermediate
    activations a configurable number of layers ahead; SiDA-MoE (Du et al., MLSys 2024,
    arXiv:2310.18859) runs an offline-trained side model once per token and predicts every layer.

    Each expert a predicted layer really uses is predicted with probability ``accuracy``; otherwise
    it is replaced by the most popular expert of that layer (over the whole trace) that the step
    does not use, so a wrong guess costs a real, useless copy. ``lookahead`` layers after the
    current one are predicted; with ``when: first_layer`` the prediction is made once per step,
    after the first layer's router (SiDA's side model; use a large ``lookahead`` for all layers).
    Seeded from the scenario seed. At accuracy 1 with lookahead 1 it equals ``oracle_next_layer``;
    at 0 every prefetch is wasted."""

    is_oracle = True

    class Config(PolicyConfig):
        """Prediction accuracy in [0, 1] for ``lookahead`` MoE layers ahead."""

        kind: Literal["accuracy_oracle"] = "accuracy_oracle"
        accuracy: float = Field(default=0.8, ge=0.0, le=1.0)
        lookahead: int = Field(default=1, ge=1)
        when: Literal["every_layer", "first_layer"] = "every_layer"

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
        self._predicted: set = set()  # (step, column) already predicted (lookahead > 1 overlaps)

    def plan(self, step, column, known):
        su, cfg = self.setup, self.config
        if cfg.when == "first_layer" and column != 0:
            return []
        out = []
        for c2 in range(column + 1, min(column + 1 + cfg.lookahead, su.num_columns)):
            if (step, c2) in self._predicted:
                continue
            self._predicted.add((step, c2))
            out.extend((c2, e) for e in self._guess(step, c2))
        if column == 0:  # forget the previous step
            self._predicted = {k for k in self._predicted if k[0] == step}
        return out

    def _guess(self, step, c2):
        true = self.setup.true_row(step, c2)
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
        return chosen
