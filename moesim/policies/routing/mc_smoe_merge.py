"""MC-SMoE expert merging: each layer's experts merged into fewer groups."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from moesim.policies.base import PolicyConfig
from moesim.policies.routing.base import RoutingPolicy, RoutingResult, gate_mass


def merge_map(col: np.ndarray, num_experts: int, groups: int) -> np.ndarray:
    """Expert -> merged expert for one layer's choices ``col`` [T, K]: the ``groups`` most used
    experts are the dominant ones; every other expert joins the dominant expert it is chosen
    together with most often (same token), else the most used one."""
    real = col[col >= 0].astype(np.int64)
    counts = np.bincount(real, minlength=num_experts)
    dominant = np.argsort(-counts, kind="stable")[:groups]
    co = np.zeros((num_experts, num_experts), dtype=np.int64)
    K = col.shape[1]
    for a in range(K):
        for b in range(K):
            if a != b:
                ok = (col[:, a] >= 0) & (col[:, b] >= 0)
                np.add.at(co, (col[ok, a].astype(np.int64), col[ok, b].astype(np.int64)), 1)
    mapping = np.arange(num_experts)
    dom = set(int(d) for d in dominant)
    for e in range(num_experts):
        if e not in dom:
            scores = co[e, dominant]
            mapping[e] = int(dominant[int(np.argmax(scores))]) if scores.max() > 0 else int(dominant[0])
    return mapping


class McSmoeMerge(RoutingPolicy):
    """MC-SMoE (Li et al., ICLR 2024, arXiv:2310.01334) merges each layer's experts into fewer
    groups around dominant experts and routes to the merged experts, cutting the memory and the
    experts to load. moesim picks the ``groups`` most used experts of each layer as dominant and
    joins every other expert to the dominant it co-activates with most (MC-SMoE groups by router
    logits, which traces lack); choices are renamed to their merged expert, and a token that picks
    two experts of one group uses the merged expert once. The merged experts keep their size."""

    class Config(PolicyConfig):
        """Merged experts per layer."""

        kind: Literal["mc_smoe_merge"] = "mc_smoe_merge"
        groups: int = Field(default=4, ge=1)

    def transform(self, experts, weights, *, num_experts, seed):
        groups = min(self.config.groups, num_experts)
        out = experts.copy()
        for l in range(experts.shape[1]):
            col = experts[:, l, :]
            mp = merge_map(col, num_experts, groups)
            out[:, l, :] = np.where(col >= 0, mp[np.maximum(col, 0)], -1)
        # a token picking two experts of one group uses the merged expert once
        for k in range(1, out.shape[2]):
            dup = (out[:, :, k : k + 1] == out[:, :, :k]).any(axis=2) & (out[:, :, k] >= 0)
            out[:, :, k] = np.where(dup, -1, out[:, :, k])
        mass = gate_mass(experts, weights)
        real = experts >= 0
        renamed = real & (out != experts)
        stats = {
            "groups_per_layer": groups,
            "renamed_share": float(renamed.sum()) / max(int(real.sum()), 1),
            "renamed_gate_mass_share": float(mass[renamed].sum()) / max(float(mass[real].sum()), 1e-300),
            "distinct_experts_per_layer": [int(len(np.unique(out[:, l][out[:, l] >= 0]))) for l in range(out.shape[1])],
        }
        return RoutingResult(
            out.astype(experts.dtype), weights, stats,
            f"MC-SMoE merging: {groups} merged experts per layer, {100 * stats['renamed_share']:.1f}% of routed "
            "choices renamed to their group's expert (groups from co-activation: a replay assumption)",
        )
