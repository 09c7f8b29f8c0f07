"""Routing-path predictor learnt on a training split: P(expert at layer l+1 | experts at layer l)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from moesim.errors import InputError
from moesim.policies.base import PolicyConfig
from moesim.policies.prefetch.base import PrefetchPolicy


class PathTable(PrefetchPolicy):
    """A first-order routing-path predictor in the spirit of ExpertFlow (He et al., 2024,
    arXiv:2410.17954), which predicts a token's later experts from the path it has taken: a
    transition table counts, over training rows, how often expert j is chosen at layer l+1 when
    expert i was chosen at layer l. After layer l's router is read, the ``k`` experts of layer l+1
    with the highest summed counts from the layer's known experts are prefetched.

    Training split: the trace rows the run does not replay (rows after ``workload.max_tokens``), so
    every prediction is out of sample; a run that replays the whole trace is refused. ExpertFlow's
    learnt routing-path model and its token re-batching are not modelled; this is its table form.
    Its measured precision and recall are in ``summary.json``."""

    class Config(PolicyConfig):
        """Transition table from unreplayed trace rows; ``k`` None = top_k x batch."""

        kind: Literal["path_table"] = "path_table"
        k: int | None = Field(default=None, ge=1)
        min_train_rows: int = Field(default=64, ge=1)

    def __init__(self, config, setup):
        super().__init__(config, setup)
        su = setup
        T = su.experts.shape[0]
        start = su.plan.rows_used
        if su.plan.looped or T - start < config.min_train_rows:
            raise InputError(
                f"needs at least {config.min_train_rows} trace rows the run does not replay to learn "
                f"from (trace has {T}, the run replays {min(start, T)}); lower workload.max_tokens",
                source=su.source,
                field="policies.prefetch.kind",
            )
        E = su.num_experts
        train = np.asarray(su.experts[start:]).astype(np.int64)
        self.table = np.zeros((su.num_columns, E, E), dtype=np.int64)
        for c in range(su.num_columns - 1):
            a = train[:, su.col_src[c]]  # [R, K]
            b = train[:, su.col_src[c + 1]]
            ii = np.repeat(a, b.shape[1], axis=1).reshape(-1)
            jj = np.tile(b, (1, a.shape[1])).reshape(-1)
            ok = (ii >= 0) & (jj >= 0)
            np.add.at(self.table[c], (ii[ok], jj[ok]), 1)
        self.k = min(config.k or su.top_k * su.batch_size, E)
        self.train_rows = T - start

    def plan(self, step, column, known):
        if column + 1 >= self.setup.num_columns or not known:
            return []
        score = self.table[column, known].sum(axis=0)
        top = np.argsort(-score, kind="stable")[: self.k]
        return [(column + 1, int(e)) for e in top if score[e] > 0]
