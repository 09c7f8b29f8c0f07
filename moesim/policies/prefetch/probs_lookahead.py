"""Next-layer look-ahead from the current layer's router distribution (a learnt linear map)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from moesim.errors import InputError
from moesim.policies.base import PolicyConfig
from moesim.policies.prefetch.base import PrefetchPolicy


def fit_map(x: np.ndarray, y: np.ndarray, how: str, ridge: float) -> np.ndarray:
    """The ``[E, E]`` map from router distributions ``x`` (``[R, E]``) to next-layer choices ``y``
    (``[R, E]``, 1 where the row chose the expert). ``least_squares``: minimises
    ``|x W - y|^2 + lam |W|^2`` with ``lam = ridge x mean diagonal of x'x`` (``ridge`` 0: the
    minimum-norm least-squares solution); ``cooccurrence``: ``W = x'y``, the next layer's choices
    counted with the weight the current layer's router gave each expert."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if how == "cooccurrence":
        return x.T @ y
    xtx = x.T @ x
    if ridge > 0:
        lam = ridge * float(np.trace(xtx)) / max(1, xtx.shape[0])
        if lam > 0:
            return np.linalg.solve(xtx + lam * np.eye(xtx.shape[0]), x.T @ y)
    return np.linalg.lstsq(x, y, rcond=None)[0]


def multi_hot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """``[R, E]`` float array with 1 at each row's chosen experts (``experts`` ``[R, K]``, -1 skipped)."""
    e = np.asarray(experts).astype(np.int64)
    out = np.zeros((e.shape[0], num_experts + 1))
    np.put_along_axis(out, np.where(e >= 0, e, num_experts), 1.0, axis=1)
    return out[:, :num_experts]


class ProbsLookahead(PrefetchPolicy):
    """Cross-layer gate look-ahead from the router distribution: after layer l's router output is
    read, the host maps it (``probs`` of the step's tokens at layer l, ``[E]`` each) through a
    per-layer ``E x E`` matrix to scores for layer l+1's experts and prefetches the ``k`` best.
    The realisable counterpart of the look-ahead predictors of Pre-gated MoE (Hwang et al., ISCA
    2024, arXiv:2308.12066), AdapMoE (Zhong et al., ICCAD 2024, arXiv:2408.10284) and Fate
    (arXiv:2502.12224), which predict layer l+1 from what layer l computed; they use gate inputs
    (hidden states), which a routing trace does not hold, so this one uses the next best thing the
    trace has, layer l's full router distribution.

    Choices (the papers' own predictors are networks or gates, not this map):

    * ``fit``: ``least_squares`` (ridge-regularised linear regression of layer l+1's multi-hot
      choices on layer l's probabilities; ``ridge`` scales the penalty) or ``cooccurrence``
      (layer l+1's choices counted with layer l's probabilities as weights).
    * ``train``: ``held_out`` fits once on the trace rows the run does not replay (rows after
      ``workload.max_tokens``; every prediction is out of sample; a run that replays the whole
      trace is refused); ``online`` accumulates the fit's sums from the steps already run (no
      future) and re-solves every ``refit_every`` steps; ``auto`` = ``held_out`` for a plain replay,
      ``online`` for a serving run (whose rows come from anywhere in the trace; noted in the run).
    * With a batch, the tokens' scores are summed; ``k`` (None = top_k x batch) experts with the
      highest scores are prefetched, ties to the lower id.

    Needs the trace's ``probs`` (``moesim trace capture --probs``). Precision and recall are
    reported in ``summary.json``.
    """

    class Config(PolicyConfig):
        """Look-ahead map from layer l's router probabilities to layer l+1's experts."""

        kind: Literal["probs_lookahead"] = "probs_lookahead"
        k: int | None = Field(default=None, ge=1, description="experts prefetched per layer (None = top_k x batch)")
        fit: Literal["least_squares", "cooccurrence"] = "least_squares"
        ridge: float = Field(default=1e-3, ge=0.0, description="least_squares: relative ridge penalty")
        train: Literal["auto", "held_out", "online"] = "auto"
        min_train_rows: int = Field(default=64, ge=1, description="held_out: fewest unreplayed rows to fit on")
        refit_every: int = Field(default=16, ge=1, description="online: steps between re-fits")

    def __init__(self, config, setup):
        super().__init__(config, setup)
        su = setup
        self.probs = self.trace_array("probs", "the router distribution probs [T, L, E]",
                                      "(capture it with `moesim trace capture --probs`)")
        E, C = su.num_experts, su.num_columns
        self.k = min(config.k or su.top_k * su.batch_size, E)
        serving = hasattr(su.plan, "step_rows")
        mode = config.train
        if mode == "auto":
            mode = "online" if serving else "held_out"
            if serving:
                su.plan.notes.append("probs_lookahead: serving run, so its map is learnt online from past steps")
        self.mode = mode
        self.maps: list = [None] * max(0, C - 1)
        if mode == "held_out":
            T = su.experts.shape[0]
            start = su.plan.rows_used
            if serving or su.plan.looped or T - start < config.min_train_rows:
                raise InputError(
                    f"train: held_out needs at least {config.min_train_rows} trace rows the run does not replay "
                    f"(trace has {T}, the run replays {min(start, T)}"
                    + (", a serving run replays rows from anywhere: use train: online" if serving else "")
                    + "); lower workload.max_tokens",
                    source=su.source,
                    field="policies.prefetch.train",
                )
            self.train_rows = T - start
            for c in range(C - 1):
                a, b = su.col_src[c], su.col_src[c + 1]
                x = np.asarray(self.probs[start:, a], dtype=np.float64)
                y = multi_hot(su.experts[start:, b], E)
                self.maps[c] = fit_map(x, y, config.fit, config.ridge)
        else:
            self.train_rows = 0
            self._xtx = np.zeros((max(0, C - 1), E, E))
            self._xty = np.zeros((max(0, C - 1), E, E))
            self._seen = np.zeros(max(0, C - 1), dtype=np.int64)  # rows in the sums
            self._fit_at = np.full(max(0, C - 1), -1, dtype=np.int64)  # step of the last fit

    def _learn(self, c: int, rows: np.ndarray) -> None:
        """Online: add the rows' (layer c probs, layer c+1 choices) to pair c's sums."""
        su = self.setup
        x = np.asarray(self.probs[rows, su.col_src[c]], dtype=np.float64)
        y = multi_hot(su.experts[rows, su.col_src[c + 1]], su.num_experts)
        self._xtx[c] += x.T @ x
        self._xty[c] += x.T @ y
        self._seen[c] += len(rows)

    def _online_map(self, c: int, step: int):
        cfg = self.config
        if self._seen[c] == 0:
            return None
        if self.maps[c] is None or step - self._fit_at[c] >= cfg.refit_every:
            if cfg.fit == "cooccurrence":
                self.maps[c] = self._xty[c].copy()
            else:
                xtx = self._xtx[c]
                lam = cfg.ridge * float(np.trace(xtx)) / max(1, xtx.shape[0])
                self.maps[c] = np.linalg.lstsq(xtx + lam * np.eye(xtx.shape[0]), self._xty[c], rcond=None)[0]
            self._fit_at[c] = step
        return self.maps[c]

    def scores(self, step: int, column: int):
        """Summed next-layer scores ``[E]`` of the step's tokens, or None before any training."""
        rows = self.setup.step_rows(step)
        W = self.maps[column] if self.mode == "held_out" else self._online_map(column, step)
        if W is None:
            return None
        x = np.asarray(self.probs[rows, self.setup.col_src[column]], dtype=np.float64)
        return (x @ W).sum(axis=0)

    def plan(self, step, column, known):
        su = self.setup
        if self.mode == "online" and column >= 1:  # layer `column`'s choices are known now
            self._learn(column - 1, su.step_rows(step))
        if column + 1 >= su.num_columns:
            return []
        score = self.scores(step, column)
        if score is None:
            return []
        top = np.argsort(-score, kind="stable")[: self.k]
        if self.config.fit == "cooccurrence":
            top = [e for e in top if score[e] > 0]
        return [(column + 1, int(e)) for e in top]
