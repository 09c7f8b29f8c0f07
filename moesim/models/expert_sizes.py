"""Per-expert sizes (heterogeneous experts): the one place the engines learn each expert's bytes.

A model's routed experts normally all have ``moe_intermediate_size`` FFN width. With heterogeneous
experts (HMoE, or Symbolic-MoE's whole models as "experts") expert ``e`` of simulated MoE column
``c`` has width ``multiplier[c, e] * moe_intermediate_size``: its parameters, its bytes (what one
load moves and what it takes in a cache pool) and its FLOPs scale with the multiplier.

Where the multipliers come from, in order: a routing policy that provides them
(:class:`~moesim.policies.routing.base.RoutingResult` ``size_multipliers``, per trace column, e.g.
HMoE's popularity assignment or Symbolic-MoE's model sizes), else ``model.expert_size_multipliers``
(one per expert, the same at every MoE layer), else none: every expert has the model's one size and
the engines run their old uniform code paths (``resolve`` returns None). Multipliers that are all 1
take the sized code paths and give the uniform run's results exactly (a tested invariant).

The engines see sizes only through :class:`ExpertSizes`: the cache policies through
``CacheSetup.key_bytes`` (bytes of each cache key ``column * num_experts + expert``), the single-GPU
engine through per-key copy times and per-size-class kernel-time tables, the expert-parallel
engine through per-class kernel times and per-GPU placement bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.errors import InputError


@dataclass
class ExpertSizes:
    """Size multiplier of every (simulated MoE column, expert) and what follows from it.

    ``mult`` [C, E]: FFN width over ``moe_intermediate_size``; ``base_bytes``: bytes of an expert of
    multiplier 1 (``model.expert_bytes``); ``source``: where the multipliers came from."""

    mult: np.ndarray
    base_bytes: int
    source: str = ""

    def __post_init__(self):
        self.mult = np.asarray(self.mult, dtype=np.float64)
        C, E = self.mult.shape
        self.num_experts = E
        flat = self.mult.reshape(-1)
        #: bytes of each cache key (column * E + expert)
        self.key_bytes = [int(round(x * self.base_bytes)) for x in flat.tolist()]
        #: the distinct multipliers (size classes), ascending, and the class of every key
        self.classes = sorted(set(flat.tolist()))
        idx = {v: i for i, v in enumerate(self.classes)}
        self.class_of_key = [idx[x] for x in flat.tolist()]

    @property
    def uniform(self) -> bool:
        """Whether every expert has the same size."""
        return len(self.classes) == 1

    @property
    def class_of(self) -> np.ndarray:
        """``[C, E]`` size-class index of every (column, expert)."""
        return np.asarray(self.class_of_key, dtype=np.int64).reshape(self.mult.shape)

    @property
    def total_bytes(self) -> int:
        """Bytes of all routed experts of all simulated MoE columns."""
        return int(sum(self.key_bytes))

    @property
    def max_bytes(self) -> int:
        """Bytes of the largest expert (what a transient buffer must hold)."""
        return int(max(self.key_bytes))

    def summary(self) -> dict:
        """A JSON-able report: per size class experts, bytes each and share of expert memory."""
        tot = self.total_bytes
        cls = np.asarray(self.class_of_key)
        kb = np.asarray(self.key_bytes, dtype=np.float64)
        rows = []
        for i, c in enumerate(self.classes):
            sel = cls == i
            rows.append({
                "multiplier": float(c),
                "experts": int(sel.sum()),
                "expert_bytes": int(round(c * self.base_bytes)),
                "memory_share": float(kb[sel].sum() / tot) if tot else 0.0,
            })
        return {
            "source": self.source,
            "base_expert_bytes": int(self.base_bytes),
            "total_expert_bytes": tot,
            "mean_multiplier": float(self.mult.mean()),
            "size_classes": rows,
        }


def check_multipliers(mult, num_experts: int, *, field: str, source: str) -> None:
    """InputError unless ``mult`` has one positive finite entry per expert."""
    if len(mult) != num_experts:
        raise InputError(
            f"has {len(mult)} entries, the model has {num_experts} experts per layer", field=field, source=source
        )
    if any(not (x > 0 and np.isfinite(x)) for x in mult):
        raise InputError("must be positive and finite", field=field, source=source)


def resolve(model, routing_mult, col_src, *, source: str = "scenario") -> ExpertSizes | None:
    """The run's :class:`ExpertSizes`, or None when every expert has the model's one size.

    ``routing_mult``: ``[trace columns, E]`` multipliers a routing policy provided (or None);
    ``col_src``: the trace column each simulated MoE column replays (a column without a trace
    column of its own borrows that column's sizes, as it borrows its routing)."""
    E = model.num_experts
    C = len(col_src)
    if routing_mult is not None:
        rm = np.asarray(routing_mult, dtype=np.float64)
        mult = rm[np.asarray(col_src, dtype=np.int64)]
        origin = "routing policy"
    elif getattr(model, "expert_size_multipliers", None) is not None:
        m = model.expert_size_multipliers
        check_multipliers(m, E, field="model.expert_size_multipliers", source=source)
        mult = np.broadcast_to(np.asarray(m, dtype=np.float64), (C, E)).copy()
        origin = "model.expert_size_multipliers"
    else:
        return None
    if mult.shape != (C, E) or not np.all(np.isfinite(mult)) or np.any(mult <= 0):
        raise InputError(f"expert size multipliers must be positive, one per (layer, expert) [{C}, {E}]",
                         field="policies.routing", source=source)
    return ExpertSizes(mult, int(model.expert_bytes), origin)
