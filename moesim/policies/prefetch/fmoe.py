"""fMoE: prefetch from the expert maps of similar past requests."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from moesim.errors import InputError
from moesim.policies.base import PolicyConfig
from moesim.policies.prefetch.base import PrefetchPolicy


class FMoE(PrefetchPolicy):
    """Fine-grained expert prefetching of fMoE (Yu, Cui, Zhang, Wang & Wang 2025, "fMoE:
    Fine-Grained Expert Offloading for Large Mixture-of-Experts Serving", arXiv:2502.05370; v2
    renamed FineMoE, EuroSys 2026). fMoE keeps "expert maps" — per iteration (token step), the
    router's expert distribution at every MoE layer — of requests it has served, and for a running
    iteration looks up the stored map most similar to it and prefetches the experts that map used at
    the layers still to come.

    What moesim models: when a trace request has had all its rows served (by the trace's
    ``request`` ids), the maps of its rows (``[L, E]`` each) enter a store of at most ``store_size``
    maps (the oldest dropped). After layer l's router output of a step is read, each token's map so
    far (layers ``0..l``, or the last ``match_layers`` of them) is compared by cosine similarity with
    the same layers of every stored map; the ``neighbours`` most similar (ties to the most recently
    stored) give their layer l+1 row, averaged; the tokens' rows are summed and the ``k`` experts
    with the highest score (None = top_k x batch, ties to the lower id) are prefetched. A token whose
    best similarity is not above ``min_similarity`` predicts nothing. A map holds the router
    probabilities (``signal: probs``, when the trace has ``probs``) or 1 for each chosen expert
    (``experts``); ``auto`` picks ``probs`` when present.

    Left out: fMoE's semantic matching (prompt embeddings from a sentence model guide the first
    layers' prefetch; a trace holds no prompt text, so only its trajectory matching is modelled),
    its own expert-selection threshold on the matched map's probabilities (here top-``k``), its
    map-store deduplication and its caching policy (pair with any cache). Needs ``request`` ids in
    the trace; precision and recall are reported in ``summary.json``.
    """

    class Config(PolicyConfig):
        """fMoE trajectory matching against the expert maps of finished requests."""

        kind: Literal["fmoe"] = "fmoe"
        k: int | None = Field(default=None, ge=1, description="experts prefetched per layer (None = top_k x batch)")
        store_size: int = Field(default=2048, ge=1, description="iteration maps kept (oldest dropped)")
        signal: Literal["auto", "probs", "experts"] = "auto"
        match_layers: int | None = Field(default=None, ge=1, description="latest known layers compared (None = all)")
        neighbours: int = Field(default=1, ge=1, description="most similar maps averaged")
        min_similarity: float = Field(default=0.0, ge=0.0, le=1.0)

    def __init__(self, config, setup):
        super().__init__(config, setup)
        su = setup
        self.trace_array("request", "request ids (request [T])",
                         "to know which rows form a request (`moesim trace capture` records them)")
        tr = su.trace
        if config.signal == "probs" and tr.probs is None:
            raise InputError(
                "signal: probs needs the router distribution probs [T, L, E] in the trace; use signal: experts",
                source=su.source,
                field="policies.prefetch.signal",
            )
        self.use_probs = config.signal == "probs" or (config.signal == "auto" and tr.probs is not None)
        self.probs = tr.probs
        C, E = su.num_columns, su.num_experts
        self.k = min(config.k or su.top_k * su.batch_size, E)
        self.request = np.asarray(tr.request).astype(np.int64)
        self.req_rows = np.bincount(self.request)  # rows of each trace request
        cap = config.store_size
        self.store = np.zeros((cap, C, E))  # ring buffer of iteration maps
        self.cumsq = np.zeros((cap, C))  # per map: cumulative squared norm over layers
        self.stamp = np.full(cap, -1, dtype=np.int64)  # insertion order (-1 = empty slot)
        self.n = 0  # maps inserted so far
        self._seen: dict[int, list] = {}  # request -> rows served since its maps were last stored
        self._step = -1
        self._rowstate: list = []  # per row of the current step: (map [C, E], cumdot list, qsq list)

    # ----- maps ----------------------------------------------------------------------------------
    def row_map(self, row: int) -> np.ndarray:
        """The expert map ``[C, E]`` of trace row ``row`` (simulated columns)."""
        su = self.setup
        cs = list(su.col_src)
        if self.use_probs:
            return np.asarray(self.probs[row, cs], dtype=np.float64)
        m = np.zeros((su.num_columns, su.num_experts + 1))
        ex = np.asarray(su.experts[row, cs]).astype(np.int64)
        np.put_along_axis(m, np.where(ex >= 0, ex, su.num_experts), 1.0, axis=1)
        return m[:, : su.num_experts]

    def _store(self, row: int) -> None:
        m = self.row_map(row)
        i = self.n % self.config.store_size
        self.store[i] = m
        self.cumsq[i] = np.cumsum((m * m).sum(axis=1))
        self.stamp[i] = self.n
        self.n += 1

    def _served(self, rows) -> None:
        """The step's rows are done: store the maps of requests all of whose rows were served."""
        for r in rows.tolist():
            q = int(self.request[r])
            lst = self._seen.setdefault(q, [])
            lst.append(r)
            if len(lst) >= self.req_rows[q]:
                for x in sorted(lst):
                    self._store(x)
                del self._seen[q]

    # ----- matching ------------------------------------------------------------------------------
    def _begin_step(self, step: int) -> None:
        self._step = step
        self._rows = self.setup.step_rows(step)
        self._rowstate = [(self.row_map(int(r)), [], []) for r in self._rows]

    def similarity(self, i: int, column: int) -> np.ndarray:
        """Cosine similarity of the step's token ``i`` with every filled store slot over layers
        ``lo..column`` (``lo`` from ``match_layers``), updated incrementally (one layer per call)."""
        m, cumdot, qsq = self._rowstate[i]
        filled = min(self.n, self.config.store_size)
        while len(cumdot) <= column:
            c = len(cumdot)
            d = self.store[:filled, c] @ m[c]
            q = float(m[c] @ m[c])
            cumdot.append(d if c == 0 else cumdot[-1] + d)
            qsq.append(q if c == 0 else qsq[-1] + q)
        ml = self.config.match_layers
        lo = 0 if ml is None else max(0, column + 1 - ml)
        dot = cumdot[column] - (cumdot[lo - 1] if lo > 0 else 0.0)
        qn = qsq[column] - (qsq[lo - 1] if lo > 0 else 0.0)
        sn = self.cumsq[:filled, column] - (self.cumsq[:filled, lo - 1] if lo > 0 else 0.0)
        den = np.sqrt(np.maximum(sn, 0.0) * max(qn, 0.0))
        out = np.zeros(filled)
        ok = den > 0
        out[ok] = dot[ok] / den[ok]
        return out

    def scores(self, step: int, column: int):
        """Summed layer ``column + 1`` rows of the tokens' best matches ``[E]``, or None."""
        if step != self._step:
            self._begin_step(step)
        filled = min(self.n, self.config.store_size)
        if filled == 0:
            return None
        total = np.zeros(self.setup.num_experts)
        any_match = False
        stamp = self.stamp[:filled]
        for i in range(len(self._rows)):
            sim = self.similarity(i, column)
            order = np.lexsort((-stamp, -sim))[: self.config.neighbours]
            order = order[sim[order] > self.config.min_similarity]
            if len(order) == 0:
                continue
            any_match = True
            total += self.store[order, column + 1].mean(axis=0)
        return total if any_match else None

    def plan(self, step, column, known):
        su = self.setup
        out = []
        if column + 1 < su.num_columns:
            score = self.scores(step, column)
            if score is not None:
                top = np.argsort(-score, kind="stable")[: self.k]
                out = [(column + 1, int(e)) for e in top if score[e] > 0]
        if column == su.num_columns - 1:  # the step is done: its rows count as served
            self._served(su.step_rows(step))
        return out
