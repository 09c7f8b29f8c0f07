"""Routing-path predictor learnt on a training split: P(expert at layer l+1 | experts at layer l),
or, with ``context_layers`` > 1, given each token's path over its last few layers (EdgeMoE)."""

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
    Its measured precision and recall are in ``summary.json``.

    ``context_layers`` = n > 1 conditions on more of the path, as EdgeMoE's statistical preloading
    profile does (Yi et al. 2023, arXiv:2308.14352: experts predicted from the experts a token took
    at earlier layers; how many layers back is our choice, the field): the training rows count,
    per layer l and per path of a token over layers l-d+1..l (d = n, ..., 1; a layer's part of the
    path is the token's set of experts there), how often each expert follows at layer l+1. After
    layer l's router, each token of the step takes the distribution of its longest path seen in
    training (backing off to shorter ones, and to the first-order table when even its layer-l set
    was never seen); the ``k`` experts with the largest summed probability are prefetched. With
    n = 1 the first-order table above is used unchanged."""

    class Config(PolicyConfig):
        """Transition table from unreplayed trace rows; ``k`` None = top_k x batch."""

        kind: Literal["path_table"] = "path_table"
        k: int | None = Field(default=None, ge=1)
        min_train_rows: int = Field(default=64, ge=1)
        context_layers: int = Field(
            default=1, ge=1, description="earlier MoE layers of each token's path the prediction is conditioned on"
        )
        min_path_count: int = Field(
            default=1, ge=1, description="context_layers > 1: training tokens a path needs before it is used "
            "(rarer paths back off to shorter ones)"
        )

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
        self.paths: dict = {}  # (layer column, depth d, path) -> {next expert: count}
        if config.context_layers > 1:
            ch = [[_choice(r) for r in train[:, su.col_src[c]]] for c in range(su.num_columns)]
            for c in range(su.num_columns - 1):
                nxt = train[:, su.col_src[c + 1]]
                for i in range(train.shape[0]):
                    follow = [int(e) for e in nxt[i] if e >= 0]
                    if not follow:
                        continue
                    for d in range(1, min(config.context_layers, c + 1) + 1):
                        cnt = self.paths.setdefault((c, d, tuple(ch[c - j][i] for j in range(d - 1, -1, -1))), {})
                        for e in follow:
                            cnt[e] = cnt.get(e, 0) + 1

    def path_scores(self, step: int, column: int) -> np.ndarray:
        """Summed next-layer distribution of the step's tokens, each from its longest path over
        layers ``column - d + 1 .. column`` seen in training (first-order counts as the last resort)."""
        su = self.setup
        E = su.num_experts
        score = np.zeros(E)
        n = min(self.config.context_layers, column + 1)
        need = self.config.min_path_count
        for row in su.step_rows(step):
            ex = su.experts[int(row)]
            path = [_choice(ex[su.col_src[c]]) for c in range(column - n + 1, column + 1)]
            for d in range(n, 0, -1):
                cnt = self.paths.get((column, d, tuple(path[n - d:])))
                tot = sum(cnt.values()) if cnt else 0
                if tot and tot >= need:
                    for e, v in cnt.items():
                        score[e] += v / tot
                    break
            else:
                own = list(path[-1])
                row_c = self.table[column, own].sum(axis=0) if own else np.zeros(E)
                if row_c.sum() > 0:
                    score += row_c / row_c.sum()
        return score

    def plan(self, step, column, known):
        if column + 1 >= self.setup.num_columns or not known:
            return []
        if self.config.context_layers > 1:
            score = self.path_scores(step, column)
        else:
            score = self.table[column, known].sum(axis=0)
        top = np.argsort(-score, kind="stable")[: self.k]
        return [(column + 1, int(e)) for e in top if score[e] > 0]


def _choice(experts) -> tuple:
    """A token's part of a routing path at one layer: its experts there, sorted (-1 dropped)."""
    return tuple(sorted(int(e) for e in experts if e >= 0))
