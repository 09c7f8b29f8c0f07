"""D²MoE's nested bit-slices: an expert loads as many most-significant slices as its tokens need."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moesim.errors import InputError
from moesim.policies.base import PolicyConfig
from moesim.policies.precision.base import Level, PrecisionPolicy

#: integer expert dtypes a slice stack can be cut from, and their bits
STACK_BITS = {"int8": 8, "int4": 4}


class D2Moe(PrecisionPolicy):
    """D²MoE (Haodong Wang, Qihua Zhou, Zicong Hong, Song Guo: "D²MoE: Dual Routing and Dynamic
    Scheduling for Efficient On-Device MoE-based LLM Serving", MobiCom 2025, arXiv:2504.15299).

    Its Matryoshka weight quantisation stores each expert as one integer stack whose top bits form
    a coarser quantisation of the same weights, so an expert can be loaded and run at any depth of
    the stack, and a copy already on the GPU can be deepened later by loading only the missing
    lower slices. Its hottest-expert-bit-first (HEBF) scheduler gives bits to the experts that
    matter most first, under a memory budget.

    What moesim models: the model's ``expert_dtype`` (int8 or int4) is the full stack, cut into
    ``slice_bits`` most-significant first (default 2 + 2 + 4: int2 -> int4 -> int8). The depth a
    (step, layer) asks of an expert is 1 + the number of ``thresholds`` its mean gate weight reaches.
    Every miss loads at least its base slice (it must run); then deeper slices of missing and
    resident experts are granted hottest expert first, one slice at a time MSB first, while the
    layer's transfer budget ``layer_budget_mib`` lasts (None = no budget). A resident expert held
    shallower than asked is topped up (``top_up``), growing its cache entry (the cache policy
    evicts to make room; if it cannot, the copy stays as it is). A copy never loses slices while
    resident. Kernels run at the depth held: ``depth_bits / 8`` bytes per weight at int8 math.

    What the paper leaves open (choices, config fields): the slice widths, how gate weight maps to
    depth (thresholds here; the paper also matches depth to task requirements, not modelled), and
    what the budget bounds (here the bytes one layer may move, base slices included; the cache's
    capacity bounds GPU memory). Scales are not counted, as for the plain int formats; D²MoE's
    dual routing between requests and its I/O-computation pipeline beyond this engine's copy
    engine are not modelled."""

    class Config(PolicyConfig):
        """Slice widths (MSB first), gate-weight thresholds for each deeper slice, a transfer budget."""

        kind: Literal["d2moe"] = "d2moe"
        slice_bits: list[int] = Field(default=[2, 2, 4], min_length=1, description="bits of each slice, MSB first")
        thresholds: list[float] = Field(
            default=[0.15, 0.35],
            description="mean gate weight at which an expert asks for slice 2, 3, ... (one per slice after "
            "the first, non-decreasing)",
        )
        layer_budget_mib: float | None = Field(
            default=None, gt=0, description="bytes (MiB) one (step, layer) may load, base slices included; None = no limit"
        )
        top_up: bool = Field(default=True, description="deepen resident experts that are asked for more slices")

        @model_validator(mode="after")
        def _check(self):
            if any(b < 1 for b in self.slice_bits):
                raise ValueError("slice_bits must be >= 1 each")
            if len(self.thresholds) != len(self.slice_bits) - 1:
                raise ValueError(f"thresholds needs {len(self.slice_bits) - 1} values (one per slice after the first)")
            if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
                raise ValueError("thresholds must lie in [0, 1]")
            if self.thresholds != sorted(self.thresholds):
                raise ValueError("thresholds must be non-decreasing")
            return self

    def __init__(self, config, setup=None):
        super().__init__(config, setup)
        self.n = len(config.slice_bits)
        self.level_bytes: list | None = None  # bytes of one expert copy per level (bound by the engine)
        self.budget = None if config.layer_budget_mib is None else config.layer_budget_mib * 2**20

    def levels(self, model) -> list[Level]:
        """Level 0 = the whole stack (the model's expert dtype), level i = the top ``n - i`` slices."""
        full = model.expert_dtype or model.dtype
        total = STACK_BITS.get(full)
        src = getattr(self.setup, "source", "scenario")
        if total is None:
            raise InputError(
                f"d2moe cuts an integer stack: model.expert_dtype must be one of {sorted(STACK_BITS)}, got {full!r}",
                source=src, field="model.expert_dtype",
            )
        if sum(self.config.slice_bits) != total:
            raise InputError(
                f"slices {self.config.slice_bits} sum to {sum(self.config.slice_bits)} bits, the {full} stack has {total}",
                source=src, field="policies.precision.slice_bits",
            )
        out = [Level(full, total / 8, full)]
        cum = 0
        depth_bits = []
        for b in self.config.slice_bits:
            cum += b
            depth_bits.append(cum)
        for d in range(self.n - 1, 0, -1):  # level n - d holds depth d
            bits = depth_bits[d - 1]
            out.append(Level(f"mwq{bits}", bits / 8, None, "int8"))
        return out

    def wanted_level(self, weight: float) -> int:
        """The level (0 = all slices) gate ``weight`` asks for."""
        depth = 1
        for t in self.config.thresholds:
            if weight >= t:
                depth += 1
        return self.n - depth

    def plan_layer(self, column, misses, resident):
        lb = self.level_bytes
        base = self.n - 1
        out = {e: base for e, _ in misses}
        spent = len(misses) * lb[base]
        cand = [(-w, i, e, base, self.wanted_level(w), True) for i, (e, w) in enumerate(misses)]
        if self.config.top_up:
            j = len(misses)
            for i, (e, w, held) in enumerate(resident):
                want = self.wanted_level(w)
                if want < held:
                    cand.append((-w, j + i, e, held, want, False))
        cand.sort()
        budget = self.budget
        tops = {}
        for _, _, e, have, want, is_miss in cand:
            cur = have
            while cur > want:
                cost = lb[cur - 1] - lb[cur]
                if budget is not None and spent + cost > budget:
                    break
                spent += cost
                cur -= 1
            if is_miss:
                out[e] = cur
            elif cur < have:
                tops[e] = cur
        return out, tops
