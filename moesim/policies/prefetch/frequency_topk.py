"""Frequency-based top-k preload: a realisable predictor learnt online from past routing."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from moesim.policies.base import PolicyConfig
from moesim.policies.prefetch.base import PrefetchPolicy


class FrequencyTopK(PrefetchPolicy):
    """After layer l's router is read, load the ``k`` experts of layer l+1 used most often so far in
    this run (counts learnt online from past steps only: no future knowledge). The frequency-based
    prefetch baseline used in the offloading literature (e.g. as compared against in ProMoE, Song et
    al., 2024, arXiv:2410.22134). ``k`` defaults to the model's top_k times the batch size, capped at
    the number of experts."""

    class Config(PolicyConfig):
        """Top-``k`` most frequent experts of the next layer (``k`` None = top_k x batch)."""

        kind: Literal["frequency_topk"] = "frequency_topk"
        k: int | None = Field(default=None, ge=1)

    def __init__(self, config, setup):
        super().__init__(config, setup)
        self.counts = np.zeros((setup.num_columns, setup.num_experts), dtype=np.int64)
        self.k = min(config.k or setup.top_k * setup.batch_size, setup.num_experts)

    def plan(self, step, column, known):
        self.counts[column, known] += 1  # what the host has just learnt
        c2 = column + 1
        if c2 >= self.setup.num_columns or step == 0:
            return []
        row = self.counts[c2]
        top = np.argsort(-row, kind="stable")[: self.k]
        return [(c2, int(e)) for e in top if row[e] > 0]
