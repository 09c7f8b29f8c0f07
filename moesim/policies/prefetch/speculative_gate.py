"""Mixtral-offloading's speculative expert loading: the next layer's gate applied early."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from moesim.errors import InputError
from moesim.policies.base import PolicyConfig
from moesim.policies.prefetch.base import PrefetchPolicy


class SpeculativeGate(PrefetchPolicy):
    """Speculative expert loading of Mixtral-offloading (Eliseev & Mazur 2023, "Fast Inference of
    Mixture-of-Experts Language Models with Offloading", arXiv:2312.17238): while layer l runs, the
    runtime applies layer l+1's gating function to layer l's hidden state — possible because
    the residual stream changes little from one layer to the next — and starts loading the experts
    it picks; a right guess is a cache hit when layer l+1 asks for it.

    The guess depends on hidden states, which only a capture sees, so it is read from the trace's
    ``spec_next`` array (``moesim trace capture --spec-next residual|gate_input``): for each token
    and MoE layer, the experts layer l+1's router picks on layer l's hidden state. Which hidden
    state the paper means is a capture-time choice: ``gate_input`` (what layer l's router saw; our
    reading of the paper, "the same hidden states that the current layer's gate uses") or
    ``residual`` (the stream leaving layer l, after its experts); the trace's
    ``meta.captured_with.spec_next_input`` says which. A ``gate_input`` guess is computed alongside
    layer l's router, so the host knows it at layer l's router read-back, where moesim issues every
    prefetch. A ``residual`` guess exists only after layer l's experts have run, later than that
    moment, so such a trace is refused unless ``accept_residual`` (the run is then optimistic by
    layer l's expert time). A trace that does not say is taken as ``gate_input``.

    ``ranks``: how many of each token's guessed experts to prefetch (None = all ``top_k``; the
    paper loads the guessed top-k). With a batch, the union over the step's tokens in row, then
    rank, order. Needs every MoE layer of the model in the trace, in order (the guess of column l
    is for column l+1). Precision and recall are reported in ``summary.json``.
    """

    class Config(PolicyConfig):
        """Prefetch the trace's speculative next-layer guess (``spec_next``)."""

        kind: Literal["speculative_gate"] = "speculative_gate"
        ranks: int | None = Field(default=None, ge=1, description="guessed ranks per token (None = all)")
        accept_residual: bool = Field(
            default=False, description="replay a residual-stream guess at the router read-back (optimistic)"
        )

    def __init__(self, config, setup):
        super().__init__(config, setup)
        su = setup
        self.trace_array("spec_next", "the speculative next-layer guess spec_next [T, L, K]",
                         "(capture it with `moesim trace capture --spec-next residual`)")
        tr = su.trace
        cs = tuple(su.col_src)
        if cs != tuple(range(len(cs))) or tr.spec_next.shape[1] != len(cs):
            raise InputError(
                "needs a trace with a column for every MoE layer of the model, in order (spec_next of "
                "column l guesses column l+1); this run maps model layers to trace columns "
                f"{list(cs)[:8]}{' ...' if len(cs) > 8 else ''}",
                source=su.source,
                field="policies.prefetch.kind",
            )
        cw = (tr.meta or {}).get("captured_with")
        self.spec_input = cw.get("spec_next_input", "gate_input") if isinstance(cw, dict) else "gate_input"
        if self.spec_input == "residual" and not config.accept_residual:
            raise InputError(
                "the trace's spec_next was computed on the residual stream after each layer's experts, "
                "which the host has only after those experts ran, later than the router read-back "
                "where prefetches are issued; capture with --spec-next gate_input, or set "
                "accept_residual: true for an optimistic bound",
                source=su.source,
                field="policies.prefetch.accept_residual",
            )
        self.spec = tr.spec_next
        self.ranks = config.ranks

    def guess(self, step: int, column: int) -> list:
        """Distinct guessed experts of ``column + 1`` for ``step`` (row, then rank, order)."""
        rows = self.setup.step_rows(step)
        g = np.asarray(self.spec[rows, column])[:, : self.ranks].reshape(-1)
        out, seen = [], set()
        for e in g.tolist():
            if e >= 0 and e not in seen:
                seen.add(e)
                out.append(e)
        return out

    def plan(self, step, column, known):
        if column + 1 >= self.setup.num_columns:
            return []
        return [(column + 1, e) for e in self.guess(step, column)]
