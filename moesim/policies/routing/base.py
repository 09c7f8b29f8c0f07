"""The routing-policy interface: a transform of the replayed routing, applied before the run.

A routing policy turns the trace's ``experts [T, L, K]`` (and gate ``weights``) into the routing the
modelled variant would produce: choices that need no expert weights become ``-1`` (no load, no
kernel, no traffic), merged or pruned experts are renamed. It reports what it changed (the share of
routed choices and of gate mass affected: a quality proxy) in ``summary.json``'s ``routing`` block and
in ``routing_note``. Real routing would also change with the variant (a retrained router); moesim
cannot know how, so these transforms are replay assumptions and say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from moesim.policies.base import Policy


@dataclass
class RoutingResult:
    """Transformed routing and what the transform did."""

    experts: np.ndarray
    weights: np.ndarray | None
    stats: dict = field(default_factory=dict)
    note: str = ""
    #: heterogeneous experts: ``[trace columns, E]`` FFN-width multipliers the engines use for
    #: bytes, cache room and kernel time (see :mod:`moesim.models.expert_sizes`); None = the model's
    size_multipliers: np.ndarray | None = None
    #: when the transform reorders or repeats rows: the source row of each output row (the trace's
    #: per-row arrays follow it), else None
    rows: np.ndarray | None = None


class RoutingPolicy(Policy):
    """Base of routing policies."""

    family = "routing"
    #: extra keyword inputs ``transform`` accepts beyond experts and weights: ``probs`` (the
    #: trace's router distribution [T, L, E], None when it has none), ``expert_bytes`` (bytes
    #: of one routed expert), ``request`` (the trace's request id per row, or None) and
    #: ``expert_params`` (parameters of one routed expert). :meth:`transform_trace` passes exactly these.
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    #: the ``stats`` key that is this variant's quality proxy (1 = nothing lost); when a policy
    #: does not report ``gate_mass_kept_share`` itself, :meth:`effects` computes it (:func:`gate_mass_kept`)
    quality_proxy: ClassVar[str] = "gate_mass_kept_share"

    def __init__(self, config, setup=None):
        super().__init__(config)
        self.setup = setup

    def transform(self, experts: np.ndarray, weights, *, num_experts: int, seed: int) -> RoutingResult:
        """The routing this variant replays (``experts`` [T, L, K], -1 = none)."""
        return RoutingResult(experts, weights)

    def transform_trace(self, trace, *, num_experts: int, seed: int, expert_bytes: int | None = None,
                        expert_params: int | None = None) -> RoutingResult:
        """:meth:`transform` of a :class:`~moesim.traces.format.Trace`, passing the trace's
        ``probs`` (and ``expert_bytes``) to the policies that use them (``extra_inputs``)."""
        extra = {}
        if "probs" in self.extra_inputs:
            extra["probs"] = None if trace.probs is None else np.asarray(trace.probs)
        if "expert_bytes" in self.extra_inputs:
            extra["expert_bytes"] = expert_bytes
        if "request" in self.extra_inputs:
            extra["request"] = None if trace.request is None else np.asarray(trace.request)
        if "expert_params" in self.extra_inputs:
            extra["expert_params"] = expert_params
        return self.transform(
            np.asarray(trace.experts), None if trace.weights is None else np.asarray(trace.weights),
            num_experts=num_experts, seed=seed, **extra,
        )

    def baseline(self, trace, result: RoutingResult) -> tuple[np.ndarray, np.ndarray | None]:
        """The routing (``[T, L, K]``) and expert size multipliers (None = the model's one size) that
        :meth:`effects` compares this variant with: the trace's routing replayed unchanged on the
        model's experts (a variant that introduces sizes, as HMoE, is compared with equal experts)."""
        return np.asarray(trace.experts), None

    def effects(self, trace, result: RoutingResult, *, num_experts: int, expert_bytes: int | None,
                step_rows: int = 1) -> dict:
        """The four effects every routing variant reports in ``summary.json`` ``routing.effects``:
        ``bytes_moved``, ``compute``, ``cache`` (:func:`routing_effects`, the trace's routing
        before vs this variant's after) and ``quality`` (``proxy``: the stats key, ``value``)."""
        before, size_before = self.baseline(trace, result)
        out = routing_effects(before, result.experts, num_experts=num_experts, size_before=size_before,
                              size_after=result.size_multipliers, expert_bytes=expert_bytes, step_rows=step_rows)
        key = self.quality_proxy
        value = result.stats.get(key)
        if value is None and key == "gate_mass_kept_share":
            value = gate_mass_kept(trace.experts, trace.weights, result.experts, result.rows)
        out["quality"] = {"proxy": key, "value": None if value is None else float(value)}
        return out


def gate_mass(experts: np.ndarray, weights) -> np.ndarray:
    """Gate weight of every choice ([T, L, K]); 1/K per real choice when the trace has none."""
    if weights is None:
        return np.where(experts >= 0, 1.0 / experts.shape[2], 0.0)
    return np.where(experts >= 0, np.asarray(weights, dtype=np.float64), 0.0)


def drop_stats(before: np.ndarray, after: np.ndarray, mass: np.ndarray) -> dict:
    """Share of routed choices, and of gate mass, that the transform removed."""
    real = before >= 0
    dropped = real & (after < 0)
    n = int(real.sum())
    m = float(mass[real].sum())
    return {
        "routed_choices": n,
        "dropped_choices": int(dropped.sum()),
        "dropped_share": (float(dropped.sum()) / n) if n else 0.0,
        "dropped_gate_mass_share": (float(mass[dropped].sum()) / m) if m else 0.0,
    }


def _step_presence(experts: np.ndarray, step_rows: int, num_ids: int) -> np.ndarray:
    """``[steps, L, num_ids]`` booleans: whether a step (``step_rows`` consecutive rows, the last
    possibly short) uses expert e at trace column l."""
    T, L, _ = experts.shape
    steps = -(-T // max(1, step_rows)) if T else 0
    seen = np.zeros((steps, L, num_ids), dtype=bool)
    t, l, k = np.nonzero(experts >= 0)
    seen[t // max(1, step_rows), l, experts[t, l, k].astype(np.int64)] = True
    return seen


def _sizes(size, L: int, num_ids: int) -> np.ndarray:
    """Size multipliers ``[L, num_ids]`` (1 = the model's routed expert), padded with 1."""
    out = np.ones((L, num_ids))
    if size is not None:
        s = np.asarray(size, dtype=np.float64)
        out[: s.shape[0], : s.shape[1]] = s[:L, :num_ids]
    return out


def _side(experts: np.ndarray, size: np.ndarray, step_rows: int, num_ids: int, expert_bytes) -> dict:
    """The routing-level figures of one routing (before or after a transform)."""
    ex = np.asarray(experts)
    T, L, _ = ex.shape
    seen = _step_presence(ex, step_rows, num_ids)
    real = ex >= 0
    t, l, k = np.nonzero(real)
    work = float(size[l, ex[t, l, k].astype(np.int64)].sum())
    ws = seen.any(axis=0) if len(seen) else np.zeros((L, num_ids), dtype=bool)
    later = int(seen[1:].sum())
    eb = int(expert_bytes) if expert_bytes else None
    return {
        "rows": int(T),
        "choices": int(real.sum()),
        "work": work,
        "experts_per_token_layer": float(real.sum()) / (T * L) if T * L else 0.0,
        "accesses": int(seen.sum()),
        "streamed": round(float((seen * size[None]).sum()) * eb) if eb else None,
        "ws_experts": int(ws.sum()),
        "ws_bytes": round(float((ws * size).sum()) * eb) if eb else None,
        "reuse": float((seen[1:] & seen[:-1]).sum()) / later if later else 0.0,
    }


def _ratio(a, b):
    return (float(b) / float(a)) if a else None


def routing_effects(before: np.ndarray, after: np.ndarray, *, num_experts: int, size_before=None, size_after=None,
                    expert_bytes: int | None = None, step_rows: int = 1) -> dict:
    """What a routing transform changes, from the routing alone (no timing run): ``before`` is the
    trace's routing replayed unchanged, ``after`` the variant's, each over all its rows, in steps
    of ``step_rows`` consecutive rows (the fixed-batch engine's decode steps at that batch size).

    * ``bytes_moved``: expert bytes a run that loads every expert a step uses, once per step and
      trace column, with no cache (streaming) would move (each expert at its size multiplier x
      ``expert_bytes``); a cached run's ``transfers`` are at most this;
    * ``compute``: routed (token, expert) choices and the expert work they make (choices weighted
      by the expert's size multiplier: FFN FLOPs in units of one routed expert of the model);
    * ``cache``: cache accesses (distinct experts per step and column: the DESIGN's accounting), the
      working set (distinct (column, expert) pairs and their bytes: the cache that would hold every
      expert the trace needs) and the step-to-step reuse (share of a step's accesses the previous
      step made too: what a cache of one step's experts would hit);
    * ``ratio`` keys are after / before. Sizes are ``[columns, experts]`` multipliers (None = 1).
    """
    b, a = np.asarray(before), np.asarray(after)
    n_ids = int(max(num_experts, (b.max() + 1) if b.size else 0, (a.max() + 1) if a.size else 0))
    L = max(b.shape[1], a.shape[1])
    sb = _side(b, _sizes(size_before, L, n_ids), step_rows, n_ids, expert_bytes)
    sa = _side(a, _sizes(size_after, L, n_ids), step_rows, n_ids, expert_bytes)
    return {
        "step_rows": int(step_rows),
        "rows_before": sb["rows"],
        "rows_after": sa["rows"],
        "bytes_moved": {
            "streamed_expert_bytes_before": sb["streamed"],
            "streamed_expert_bytes_after": sa["streamed"],
            "ratio": _ratio(sb["streamed"], sa["streamed"]) if expert_bytes else None,
        },
        "compute": {
            "expert_choices_before": sb["choices"],
            "expert_choices_after": sa["choices"],
            "experts_per_token_layer_before": sb["experts_per_token_layer"],
            "experts_per_token_layer_after": sa["experts_per_token_layer"],
            "expert_work_before": sb["work"],
            "expert_work_after": sa["work"],
            "ratio": _ratio(sb["work"], sa["work"]),
        },
        "cache": {
            "accesses_before": sb["accesses"],
            "accesses_after": sa["accesses"],
            "ratio": _ratio(sb["accesses"], sa["accesses"]),
            "working_set_experts_before": sb["ws_experts"],
            "working_set_experts_after": sa["ws_experts"],
            "working_set_bytes_before": sb["ws_bytes"],
            "working_set_bytes_after": sa["ws_bytes"],
            "step_reuse_share_before": sb["reuse"],
            "step_reuse_share_after": sa["reuse"],
        },
    }


def gate_mass_kept(before: np.ndarray, weights, after: np.ndarray, rows=None) -> float:
    """Share of the trace's gate mass whose expert the transformed routing still uses at the same
    (row, column): a choice dropped, or renamed to another expert, loses its mass. ``rows``: the
    source row of each output row when the transform reordered or repeated rows."""
    b = np.asarray(before)
    mass = gate_mass(b, weights)
    if rows is not None:
        b, mass = b[rows], mass[rows]
    a = np.asarray(after)
    L = min(b.shape[1], a.shape[1])
    real = b >= 0
    kept = np.zeros_like(real)
    kept[:, :L] = real[:, :L] & (b[:, :L, :, None] == a[:, :L, None, :]).any(axis=-1)
    tot = float(mass[real].sum())
    return float(mass[kept].sum()) / tot if tot else 1.0
