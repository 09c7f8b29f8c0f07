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

import numpy as np

from moesim.policies.base import Policy


@dataclass
class RoutingResult:
    """Transformed routing and what the transform did."""

    experts: np.ndarray
    weights: np.ndarray | None
    stats: dict = field(default_factory=dict)
    note: str = ""


class RoutingPolicy(Policy):
    """Base of routing policies."""

    family = "routing"

    def __init__(self, config, setup=None):
        super().__init__(config)
        self.setup = setup

    def transform(self, experts: np.ndarray, weights, *, num_experts: int, seed: int) -> RoutingResult:
        """The routing this variant replays (``experts`` [T, L, K], -1 = none)."""
        return RoutingResult(experts, weights)


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
