"""HMoE heterogeneous expert sizes: a report of bytes and compute per size class (routing unchanged)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from moesim.errors import InputError
from moesim.policies.base import PolicyConfig
from moesim.policies.routing.base import RoutingPolicy, RoutingResult, gate_mass


def size_map(experts: np.ndarray, multipliers, num_experts: int, assign: str) -> np.ndarray:
    """Size multiplier of every (trace column, expert), ``[L, E]``: ``listed`` gives expert ``e``
    ``multipliers[e]`` at every layer; ``popular_small`` / ``popular_large`` give each layer's most
    routed experts the smallest / largest sizes (ties to the lower expert id)."""
    m = np.asarray(multipliers, dtype=np.float64)
    L = experts.shape[1]
    if assign == "listed":
        return np.broadcast_to(m, (L, num_experts)).copy()
    out = np.empty((L, num_experts))
    sizes = np.sort(m) if assign == "popular_small" else -np.sort(-m)
    for l in range(L):
        col = experts[:, l]
        cnt = np.bincount(col[col >= 0].astype(np.int64), minlength=num_experts)[:num_experts]
        order = np.argsort(-cnt, kind="stable")
        out[l, order] = sizes
    return out


class HMoE(RoutingPolicy):
    """HMoE (Wang et al. 2024, arXiv:2408.10681, "Heterogeneous Mixture of Experts") gives experts
    different sizes (FFN widths) and trains the router to favour small experts.
    ``expert_size_multipliers`` (one per expert, the expert's FFN width over
    ``model.moe_intermediate_size``) are assigned to each layer's experts as listed or by the
    layer's routing frequency (``popular_small``: the most routed experts get the smallest sizes,
    standing in for HMoE's trained preference, which a homogeneous model's trace does not show).
    The engines use these sizes (see :mod:`moesim.models.expert_sizes`): a load moves the expert's
    own bytes, experts of all sizes share the cache pools by bytes, and an expert's kernel time
    scales its FLOPs and weight bytes; the expert-parallel engine's per-GPU expert compute and
    placement memory likewise. ``report_only: true`` keeps the old behaviour (every expert at the
    model's one size in the run; only the report). Reported per size class: experts, share of expert
    memory, routed choices, gate mass and expert compute; and the ratios to the homogeneous model:
    total expert memory (mean multiplier) and expert FLOPs per routed choice (also the ratio of bytes
    loaded when every routed choice is a load, e.g. streaming at batch 1). Left open by the paper
    and chosen here: the assignment of sizes to a trace's experts. The routing replayed is the
    trace's (a real HMoE router would send more tokens to small experts)."""

    extra_inputs = ("expert_bytes",)

    class Config(PolicyConfig):
        """Per-expert size multipliers and how they are assigned to the trace's experts."""

        kind: Literal["hmoe"] = "hmoe"
        expert_size_multipliers: list[float] = Field(
            min_length=1, description="one per expert: FFN width over model.moe_intermediate_size"
        )
        assign: Literal["listed", "popular_small", "popular_large"] = "listed"
        report_only: bool = Field(default=False, description="true: the run keeps one expert size")

    def transform(self, experts, weights, *, num_experts, seed, expert_bytes=None):
        cfg = self.config
        src = getattr(self.setup, "source", None)
        mult = cfg.expert_size_multipliers
        if len(mult) != num_experts:
            raise InputError(
                f"expert_size_multipliers has {len(mult)} entries, the model has {num_experts} experts per layer",
                field="policies.routing.expert_size_multipliers", source=src,
            )
        if any(not (x > 0 and np.isfinite(x)) for x in mult):
            raise InputError(
                "expert_size_multipliers must be positive and finite", field="policies.routing.expert_size_multipliers",
                source=src,
            )
        ex = np.asarray(experts)
        T, L, K = ex.shape
        sm = size_map(ex, mult, num_experts, cfg.assign)
        e64 = ex.astype(np.int64)
        real = e64 >= 0
        per_choice = np.where(real, sm[np.arange(L)[None, :, None], np.maximum(e64, 0)], 0.0)
        gm = gate_mass(ex, weights)
        n_real = int(real.sum())
        tot_compute = float(per_choice.sum())
        tot_gm = float(gm[real].sum())
        tot_mem = float(sm.sum())
        classes = []
        for c in sorted(set(float(x) for x in mult)):
            in_c = np.isclose(sm, c)
            choice_c = real & np.isclose(per_choice, c)
            row = {
                "multiplier": c,
                "experts_per_layer": int(in_c.sum()) // L,
                "memory_share": float(sm[in_c].sum()) / tot_mem,
                "routed_share": float(choice_c.sum()) / max(n_real, 1),
                "gate_mass_share": float(gm[choice_c].sum()) / tot_gm if tot_gm else 0.0,
                "compute_share": float(per_choice[choice_c].sum()) / tot_compute if tot_compute else 0.0,
            }
            if expert_bytes:
                row["expert_bytes"] = int(round(c * int(expert_bytes)))
            classes.append(row)
        compute_ratio = tot_compute / n_real if n_real else 0.0
        stats = {
            "simulated": not cfg.report_only,
            "assign": cfg.assign,
            "size_classes": classes,
            "expert_memory_ratio": tot_mem / (L * num_experts),
            "expert_compute_ratio_per_choice": compute_ratio,
            "streaming_bytes_ratio": compute_ratio,
            "gate_mass_kept_share": 1.0,
        }
        if expert_bytes:
            stats["expert_bytes_total"] = int(round(tot_mem * int(expert_bytes)))
        head = (f"HMoE heterogeneous expert sizes (multipliers {', '.join(f'{x:g}' for x in sorted(set(mult)))}, "
                f"assigned {cfg.assign})")
        ratios = (f"expert memory x{stats['expert_memory_ratio']:.3f} and expert FLOPs (and bytes of a load per "
                  f"routed choice) x{compute_ratio:.3f} of the homogeneous model's")
        if cfg.report_only:
            note = (f"{head}: REPORT ONLY, the run still loads, caches and computes every expert at the model's one "
                    f"size and replays the routing unchanged; on this routing the sizes would make {ratios}")
            return RoutingResult(ex, weights, stats, note)
        note = (f"{head}: loads, cache room and kernel times use each expert's size; on this routing the sizes "
                f"make {ratios}; the routing is the trace's (HMoE's router would favour small experts more)")
        return RoutingResult(ex, weights, stats, note, size_multipliers=sm)
