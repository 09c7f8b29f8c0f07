"""The prefetch-policy interface.

After the host has read layer ``column``'s router output at ``step`` it asks the prefetcher which
(column, expert) pairs to load ahead. The engine makes room through the cache policy (never evicting
an expert the current step needs), queues the copies on the same FIFO copy engine as demand loads,
behind that layer's demand loads, and counts them issued / used / wasted. A prefetcher is asked only
at that moment, so it can never act on what the host could not know yet; a prediction that uses
the trace's future (the oracles) is labelled as an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.errors import InputError
from moesim.policies.base import Policy


@dataclass
class PrefetchSetup:
    """What a prefetcher is told about the run: the access plan, the trace and a seed."""

    num_columns: int
    num_experts: int
    top_k: int
    plan: object  # moesim.engine.plan.DecodePlan
    col_src: tuple
    experts: np.ndarray  # trace experts [T, L, K]
    batch_size: int
    seed: int
    source: str = "scenario"
    trace: object = None  # the replayed Trace (its optional probs, request, spec_next arrays)

    def true_row(self, step: int, column: int) -> list:
        """The distinct experts ``(step, column)`` really uses (the future, for oracles)."""
        return self.plan.row(step, self.col_src[column])[0]

    def step_rows(self, step: int) -> np.ndarray:
        """Trace row indices of the tokens of ``step``, in batch order (a looped replay wraps)."""
        if hasattr(self.plan, "step_rows"):  # a serving run: the scheduler formed the step
            return np.asarray(self.plan.step_rows(step), dtype=np.int64)
        B = self.batch_size
        return np.arange(step * B, step * B + B, dtype=np.int64) % self.experts.shape[0]


class PrefetchPolicy(Policy):
    """Base of prefetch policies: ``plan`` returns (column, expert) pairs to load ahead."""

    family = "prefetch"
    is_oracle = False  # uses the trace's future: an upper bound, not a realisable predictor

    def __init__(self, config, setup: PrefetchSetup):
        super().__init__(config)
        self.setup = setup

    def trace_array(self, name: str, what: str, why: str):
        """The replayed trace's optional array ``name`` (``probs``, ``request``, ``spec_next``), for a
        predictor that cannot work without it; when the trace lacks it, the one-line input error
        "needs ``what`` in the trace ``why``" (``why``: what it is for, or how to capture it)."""
        tr = self.setup.trace
        arr = None if tr is None else getattr(tr, name, None)
        if arr is None:
            raise InputError(f"needs {what} in the trace {why}", source=self.setup.source,
                             field="policies.prefetch.kind")
        return arr

    def plan(self, step: int, column: int, known: list) -> list[tuple[int, int]]:
        """(column, expert) pairs to prefetch after the router of ``(step, column)`` was read;
        ``known`` = that layer's distinct experts (what the host has just learnt)."""
        return []
