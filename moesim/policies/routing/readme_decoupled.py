"""Read-ME router decoupling: one pre-gating decision per token chooses the experts of every layer."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from moesim.errors import InputError
from moesim.policies.base import PolicyConfig
from moesim.policies.routing.base import RoutingPolicy, RoutingResult, gate_mass


def pregate(experts: np.ndarray, weights, *, num_experts: int, decision: str, anchor: int, k: int):
    """The decoupled router's choice per row: ``[T, k]`` experts (-1 padded) and their weights.

    ``first_layer``: the row's choices at trace column ``anchor`` (its first k ranks);
    ``vote``: the k experts with the most gate mass summed over all the row's layers (ties to the
    lower id; an expert with no mass is never chosen)."""
    ex = np.asarray(experts)
    T, L, K = ex.shape
    mass = gate_mass(ex, weights)
    if decision == "first_layer":
        ids = ex[:, anchor, :k].astype(np.int64)
        w = mass[:, anchor, :k]
    else:
        votes = np.zeros((T, num_experts))
        t_idx = np.broadcast_to(np.arange(T)[:, None, None], ex.shape)
        real = ex >= 0
        np.add.at(votes, (t_idx[real], ex[real].astype(np.int64)), mass[real])
        order = np.lexsort((np.broadcast_to(np.arange(num_experts), votes.shape), -votes), axis=1)[:, :k]
        w = np.take_along_axis(votes, order, axis=1)
        ids = np.where(w > 0, order, -1)
        w = np.where(w > 0, w, 0.0)
    if k > ids.shape[1]:  # the trace has fewer ranks than k
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        w = np.pad(w, ((0, 0), (0, pad)))
    tot = w.sum(axis=1, keepdims=True)
    w = np.divide(w, tot, out=np.zeros_like(w), where=tot > 0)
    return ids, w


class ReadMeDecoupled(RoutingPolicy):
    """Read-ME (Cai, Ro, Kim, Wang, Bejnordi, Akella & Wang, NeurIPS 2024, arXiv:2410.19123,
    "Read-ME: Refactorizing LLMs as Router-Decoupled Mixture of Experts with System Co-Design")
    argues that layer-wise routers are redundant and replaces them with one pre-gating router,
    decoupled from the backbone, that runs on the token before the layers do: every layer's experts
    are known before the step starts, which lets the serving system pre-compute routing and schedule
    loads (lookahead caching and prefetching, expert-aware batching).

    As a routing kind it replays that structure: each row's decoupled decision (``k`` experts, with
    weights) is used at every MoE layer, expert ``e`` of every layer being the decision's expert
    (Read-ME's experts are sub-networks that span the layers). Which trace information stands in
    for the decoupled router's decision is moesim's choice (config ``decision``): ``first_layer``
    takes the row's choices at trace column ``anchor`` (default 0, the first MoE layer: what a
    router that sees only the token embedding comes closest to), ``vote`` the k experts with the most
    gate mass over all of the row's layers. Pair it with ``prefetch: readme_pregating``, which uses
    the known routing to load every later layer's experts after layer 0; the routing it knows is
    then this kind's, which is what a decoupled router decides. Reported: a quality proxy (the
    share of the trace's routed choices, and of their gate mass, that the decoupled routing keeps at
    the same layer), the distinct expert ids a row uses over all its layers before and after (k
    after: one decision per token), and rows whose decision is empty. Not modelled: Read-ME's refactoring of a dense
    model into experts (the trace's model stands in), its expert-aware batching of queued requests
    (pre-gating all requests of a queue; see ``batching: expertflow_rebatch`` for re-batching by
    known routing), its router's own compute (a small network, taken as free)."""

    class Config(PolicyConfig):
        """Which trace information stands for the pre-gating decision, and its experts per token."""

        kind: Literal["readme_decoupled"] = "readme_decoupled"
        decision: Literal["first_layer", "vote"] = "first_layer"
        anchor: int = Field(default=0, ge=0, description="trace column of the first_layer decision")
        k: int | None = Field(default=None, ge=1, description="experts per token; default the trace's K")

    def transform(self, experts, weights, *, num_experts, seed):
        cfg = self.config
        src = getattr(self.setup, "source", None)
        ex = np.asarray(experts)
        T, L, K = ex.shape
        if cfg.anchor >= L:
            raise InputError(f"anchor {cfg.anchor} is not a trace column (0..{L - 1})", field="policies.routing.anchor",
                             source=src)
        k = cfg.k or K
        if k > num_experts:
            raise InputError(f"k={k} exceeds num_experts={num_experts}", field="policies.routing.k", source=src)
        ids, w = pregate(ex, weights, num_experts=num_experts, decision=cfg.decision, anchor=cfg.anchor, k=k)
        out = np.broadcast_to(ids[:, None, :], (T, L, k)).astype(ex.dtype if ex.dtype.kind == "i" else np.int32)
        wout = np.broadcast_to(w[:, None, :], (T, L, k)).astype(np.float32)
        # quality proxy: the trace's choices (and gate mass) the decoupled routing keeps at the same layer
        real = ex >= 0
        kept = real & (ex[..., :, None] == out[..., None, :]).any(axis=-1)
        mass = gate_mass(ex, weights)
        n = int(real.sum())
        m_tot = float(mass[real].sum())

        def distinct(a):  # expert ids a row uses over all its layers (layer-wise routers: many)
            hit = np.zeros((T, num_experts), dtype=bool)
            t_idx = np.broadcast_to(np.arange(T)[:, None, None], a.shape)
            hit[t_idx[a >= 0], a[a >= 0].astype(np.int64)] = True
            return float(hit.sum(axis=1).mean()) if T else 0.0

        stats = {
            "decision": cfg.decision,
            "experts_per_token": k,
            "kept_choice_share": float(kept.sum()) / n if n else 1.0,
            "kept_gate_mass_share": float(mass[kept].sum()) / m_tot if m_tot else 1.0,
            "expert_ids_per_row_before": distinct(ex),
            "expert_ids_per_row_after": distinct(out),
            "empty_decisions": int((ids < 0).all(axis=1).sum()),
            "pre_gated": True,
        }
        where = f"trace column {cfg.anchor}" if cfg.decision == "first_layer" else "a gate-mass vote over all layers"
        note = (f"Read-ME decoupled router: one pre-gating decision per token ({k} experts, from {where}) used at "
                f"every MoE layer, known before the step; it keeps {100 * stats['kept_choice_share']:.1f}% of the "
                f"trace's layer-wise choices ({100 * stats['kept_gate_mass_share']:.1f}% of their gate mass): a "
                "quality proxy, as the real decoupled router is trained for it")
        return RoutingResult(np.ascontiguousarray(out), np.ascontiguousarray(wout), stats, note)
