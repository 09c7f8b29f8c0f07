"""MoE++ zero-computation experts: some routed choices need no expert weights at all."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from moesim.policies.base import PolicyConfig
from moesim.policies.routing.base import RoutingPolicy, RoutingResult, drop_stats, gate_mass


class MoePlusPlusZero(RoutingPolicy):
    """MoE++ (Jin et al., 2024, arXiv:2410.07348) adds zero-computation experts (zero, copy and
    constant experts) to each layer: a token sent to one of them needs no expert weights, so no
    load, no kernel and no traffic, and they are replicated everywhere. A trace of an ordinary MoE
    cannot say which choices MoE++'s router would send there, so moesim sends each routed choice to
    a zero-computation expert with probability ``zero_share`` (seeded), never all of a token's
    choices at a layer unless ``allow_empty``. The real model's router decides this per token."""

    class Config(PolicyConfig):
        """Share of routed choices that go to zero-computation experts."""

        kind: Literal["moepp_zero"] = "moepp_zero"
        zero_share: float = Field(default=0.25, ge=0.0, le=1.0)
        allow_empty: bool = False

    def transform(self, experts, weights, *, num_experts, seed):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x2E20]))
        real = experts >= 0
        zero = real & (rng.random(experts.shape) < self.config.zero_share)
        if not self.config.allow_empty:
            emptied = (real & ~zero).sum(axis=2) == 0
            first = np.argmax(real, axis=2)  # keep the top-ranked real choice of emptied rows
            t, l = np.nonzero(emptied & real.any(axis=2))
            zero[t, l, first[t, l]] = False
        out = np.where(zero, -1, experts).astype(experts.dtype)
        stats = drop_stats(experts, out, gate_mass(experts, weights))
        return RoutingResult(
            out, weights, stats,
            f"MoE++ zero-computation experts take {100 * stats['dropped_share']:.1f}% of routed choices "
            "(chosen at random at the configured share: a replay assumption)",
        )
