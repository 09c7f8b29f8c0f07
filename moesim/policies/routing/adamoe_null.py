"""AdaMoE null experts: low-weight choices go to null experts, so tokens use fewer real experts."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from moesim.errors import InputError
from moesim.policies.base import PolicyConfig
from moesim.policies.routing.base import RoutingPolicy, RoutingResult, drop_stats, gate_mass


class AdaMoeNull(RoutingPolicy):
    """AdaMoE (Zeng et al., EMNLP Findings 2024, arXiv:2406.13233) adds null experts to the expert
    set; a token whose gate prefers them uses fewer real experts (adaptive top-k). moesim models it
    from the trace's gate weights: a choice whose weight is below ``threshold`` goes to a null
    expert (no weights, no compute); the top-ranked choice always stays real. Needs ``weights`` in
    the trace. The fine-tuned router of AdaMoE would re-rank choices; that is not modelled."""

    class Config(PolicyConfig):
        """Gate-weight threshold below which a choice becomes a null expert."""

        kind: Literal["adamoe_null"] = "adamoe_null"
        threshold: float = Field(default=0.3, ge=0.0, le=1.0)

    def transform(self, experts, weights, *, num_experts, seed):
        if weights is None:
            raise InputError(
                "adamoe_null needs gate weights in the trace", field="policies.routing.kind",
                source=getattr(self.setup, "source", None),
            )
        w = np.asarray(weights, dtype=np.float64)
        null = (experts >= 0) & (w < self.config.threshold)
        null[:, :, 0] = False
        out = np.where(null, -1, experts).astype(experts.dtype)
        stats = drop_stats(experts, out, gate_mass(experts, weights))
        return RoutingResult(
            out, weights, stats,
            f"AdaMoE null experts take the {100 * stats['dropped_share']:.1f}% of routed choices with gate "
            f"weight below {self.config.threshold:g}",
        )
