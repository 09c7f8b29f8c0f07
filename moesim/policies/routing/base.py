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
