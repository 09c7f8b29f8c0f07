"""EdgeMoE's expert-wise bitwidth adaptation: every expert has one format, fixed offline."""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from moesim.errors import InputError
from moesim.models.spec import BYTES_PER_PARAM, Dtype
from moesim.policies.base import PolicyConfig
from moesim.policies.precision.base import Level, PrecisionPolicy

#: most count vectors the exact solver enumerates before it refuses (use the greedy rule instead)
EXACT_LIMIT = 3_000_000


class EdgeMoe(PrecisionPolicy):
    """EdgeMoE (Rongjie Yi, Liwei Guo, Shiyun Wei, Ao Zhou, Shangguang Wang, Mengwei Xu:
    "EdgeMoE: Fast On-Device Inference of MoE-based Large Language Models", arXiv:2308.14352, 2023;
    journal version "EdgeMoE: Empowering Sparse Large Language Models on Mobile Devices", IEEE
    Transactions on Mobile Computing, 2025).

    EdgeMoE keeps the experts on flash and reads them on demand. Its *expert-wise bitwidth
    adaptation* quantises each expert to its own bitwidth, chosen offline: experts whose
    quantisation costs more accuracy keep more bits, within what the user tolerates, so that
    the bytes read per expert shrink where it hurts least. At run time an expert is always read
    at the bitwidth it was given.

    What moesim models: ``formats`` are the candidate formats (default int8, int4 and HQQ 2-bit:
    moesim's format tables have no plain int2, so HQQ's 2-bit with its group scales, 2.5 bits a
    weight, stands in). Each (MoE layer, expert) of the run gets one of them before the run, and
    every load of it (demand, streamed or prefetched) moves that format's bytes and runs that
    format's kernel; the cache holds copies of mixed sizes in one byte budget. The model's
    ``expert_dtype`` is level 0 (cache slots are counted in its bytes); a format above it is refused.

    * Importance (our proxy; a trace cannot measure accuracy, which is what EdgeMoE profiles): the
      gate mass an expert serves on a profile split of the trace (``importance: gate_mass``;
      token counts without gate weights, or with ``importance: count``). The profile is the trace
      rows the run does not replay (``profile: unreplayed``, out of sample) or every row
      (``profile: all``, in sample, optimistic).
    * Damage of a format (assumption): its relative output error, by default ``2 ** -bits`` with
      ``bits`` = 8 x bytes per weight, scales included (a uniform quantiser's step); ``format_error``
      overrides it. The loss of an assignment is the sum of importance x error; only ratios matter.
    * Budget: the total bytes of all experts of the simulated layers, as ``mean_bits`` per weight
      (scales included) or ``budget_gib``. EdgeMoE states the budget as a tolerated accuracy loss
      and minimises size; with a proxy loss in no real unit, moesim fixes the size and minimises
      the loss (the same trade-off from the other side).
    * Solver: ``greedy`` upgrades, one step at a time, the expert whose next step on the formats'
      convex hull removes the most loss per byte, skipping steps that no longer fit (a more
      important expert never ends with fewer bits than a less important one); ``exact`` finds the
      minimum loss: with experts of one size only the count per format matters, and for given
      counts the best assignment gives the lowest-error formats to the most important experts, so
      it enumerates the count vectors (refused beyond a few million of them).

    The assignment (experts and bytes per format, the budget, the loss proxy) is reported in
    ``summary.json`` under ``precision.assignment``; the gate mass each format served in the run
    is ``precision.by_format``. Left out: EdgeMoE's accuracy profiling itself, its channel-wise
    quantiser, and its compute/I-O pipeline beyond this engine's copy engine and flash queue; the
    home store is sized at the model's ``expert_dtype``. Copies placed by ``warm_start`` hold level
    0 (the model's format)."""

    class Config(PolicyConfig):
        """Candidate formats, the importance profile, the size budget and the solver."""

        kind: Literal["edgemoe"] = "edgemoe"
        formats: list[Dtype] = Field(
            default=["int8", "int4", "hqq2"], min_length=1,
            description="candidate formats an expert may be given (none above model.expert_dtype)",
        )
        importance: Literal["gate_mass", "count"] = Field(
            default="gate_mass", description="importance proxy per (layer, expert) on the profile rows"
        )
        profile: Literal["unreplayed", "all"] = Field(
            default="unreplayed", description="trace rows the importance is measured on"
        )
        min_profile_rows: int = Field(default=64, ge=1)
        mean_bits: float | None = Field(
            default=4.0, gt=0, description="budget: mean bits per expert weight, scales included"
        )
        budget_gib: float | None = Field(
            default=None, gt=0, description="budget: GiB of all experts of the simulated layers (replaces mean_bits)"
        )
        format_error: dict[str, float] | None = Field(
            default=None, description="relative output error of each format; default 2 ** -bits"
        )
        solver: Literal["greedy", "exact"] = "greedy"

        @model_validator(mode="after")
        def _check(self):
            if len(set(self.formats)) != len(self.formats):
                raise ValueError("formats lists a format twice")
            sizes = {}
            for f in self.formats:
                b = BYTES_PER_PARAM[f]
                if b in sizes:
                    raise ValueError(f"formats {sizes[b]} and {f} have the same size; keep one")
                sizes[b] = f
            if self.budget_gib is not None and "mean_bits" in self.model_fields_set and self.mean_bits is not None:
                raise ValueError("give mean_bits or budget_gib, not both")
            if self.budget_gib is None and self.mean_bits is None:
                raise ValueError("needs a budget: mean_bits or budget_gib")
            if self.format_error is not None:
                extra = sorted(set(self.format_error) - set(self.formats))
                if extra:
                    raise ValueError(f"format_error names {extra}, not in formats")
                if any(not (v > 0 and math.isfinite(v)) for v in self.format_error.values()):
                    raise ValueError("format_error values must be finite and > 0")
            err = format_errors(self.formats, self.format_error)
            by_size = sorted(self.formats, key=lambda f: BYTES_PER_PARAM[f])
            for a, b in itertools.pairwise(by_size):
                if not err[b] < err[a]:
                    raise ValueError(f"{b} has more bytes per weight than {a}, so its format_error must be smaller")
            return self

    def __init__(self, config, setup=None):
        super().__init__(config, setup)
        self.assign: np.ndarray | None = None  # [columns, experts] -> level
        self._report: dict = {}

    # ----- offline: importance and assignment -----------------------------------------------------
    def importance(self) -> np.ndarray:
        """Importance ``[columns, experts]`` on the profile rows (gate mass, or token counts)."""
        su, c = self.setup, self.config
        src = getattr(su, "source", "scenario")
        T = su.experts.shape[0]
        if c.profile == "unreplayed":
            start = su.plan.rows_used
            if su.plan.looped or T - start < c.min_profile_rows:
                raise InputError(
                    f"profile 'unreplayed' needs at least {c.min_profile_rows} trace rows the run does not "
                    f"replay (trace has {T}, the run replays {min(start, T)}); lower workload.max_tokens "
                    "or use profile: all",
                    source=src, field="policies.precision.profile",
                )
            rows = slice(start, T)
        else:
            rows = slice(0, T)
        E = su.num_experts
        imp = np.zeros((su.num_columns, E), dtype=np.float64)
        use_w = c.importance == "gate_mass" and su.weights is not None
        for col in range(su.num_columns):
            ex = np.asarray(su.experts[rows, su.col_src[col]]).reshape(-1).astype(np.int64)
            ok = ex >= 0
            if use_w:
                w = np.asarray(su.weights[rows, su.col_src[col]], dtype=np.float64).reshape(-1)[ok]
            else:
                w = np.ones(int(ok.sum()))
            np.add.at(imp[col], ex[ok], w)
        self.profile_rows = rows.stop - rows.start
        return imp

    def levels(self, model) -> list[Level]:
        """Level 0 = the model's expert dtype, then the candidate formats other than it; solves the
        assignment (bytes per format as the engine will move them)."""
        full = model.expert_dtype or model.dtype
        src = getattr(self.setup, "source", "scenario")
        for f in self.config.formats:
            if BYTES_PER_PARAM[f] > BYTES_PER_PARAM[full]:
                raise InputError(
                    f"format {f} ({8 * BYTES_PER_PARAM[f]:g} bits a weight) is above model.expert_dtype {full} "
                    f"({8 * BYTES_PER_PARAM[full]:g}); an expert cannot gain bits",
                    source=src, field="policies.precision.formats",
                )
        names = [full] + [f for f in self.config.formats if f != full]
        out = [Level(n, BYTES_PER_PARAM[n], n) for n in names]
        nb = [model.expert_bytes if n == full else model.model_copy(update={"expert_dtype": n}).expert_bytes
              for n in names]
        self._solve(model, names, nb)
        return out

    def _solve(self, model, names: list, level_bytes: list) -> None:
        c = self.config
        src = getattr(self.setup, "source", "scenario")
        imp = self.importance()
        C, E = imp.shape
        n = C * E
        cand = [names.index(f) for f in c.formats]  # level of each candidate format
        fb = np.array([level_bytes[lv] for lv in cand], dtype=np.int64)
        err = format_errors(c.formats, c.format_error)
        fe = np.array([err[f] for f in c.formats])
        if c.budget_gib is not None:
            budget = int(c.budget_gib * 2**30)
            field = "policies.precision.budget_gib"
        else:
            budget = math.floor(c.mean_bits * model.expert_params * n / 8 + 1e-6)
            field = "policies.precision.mean_bits"
        least = int(fb.min()) * n
        if budget < least:
            raise InputError(
                f"budget of {budget / 2**30:.3f} GiB is below the smallest assignment ({least / 2**30:.3f} GiB: "
                f"all {n} experts as {c.formats[int(np.argmin(fb))]})",
                source=src, field=field,
            )
        flat = imp.reshape(-1)
        if c.solver == "exact":
            try:
                pick = solve_exact(flat, fb, fe, budget)
            except ValueError as exc:
                raise InputError(str(exc), source=src, field="policies.precision.solver") from None
        else:
            pick = solve_greedy(flat, fb, fe, budget)
        self.assign = np.array(cand, dtype=np.int64)[pick].reshape(C, E)
        total_imp = float(flat.sum())
        self._report = {
            "solver": c.solver,
            "importance": c.importance if (c.importance == "count" or self.setup.weights is not None) else "count",
            "profile_rows": int(self.profile_rows),
            "budget_bytes": budget,
            "assigned_bytes": int(fb[pick].sum()),
            "mean_bits": float(8.0 * fb[pick].sum() / (model.expert_params * n)),
            "loss_proxy": float((flat * fe[pick]).sum() / total_imp) if total_imp > 0 else 0.0,
            "experts": {f: int((pick == i).sum()) for i, f in enumerate(c.formats)},
            "importance_share": {f: (float(flat[pick == i].sum() / total_imp) if total_imp > 0 else None)
                                 for i, f in enumerate(c.formats)},
        }

    # ----- run time -------------------------------------------------------------------------------
    def plan_layer(self, column, misses, resident):
        a = self.assign[column]
        return {e: int(a[e]) for e, _ in misses}, {}

    def prefetch_level(self, column: int, expert: int) -> int:
        return int(self.assign[column, expert])

    def report(self) -> dict:
        return {"assignment": self._report}


def format_errors(formats, overrides=None) -> dict:
    """Relative output error of each format: ``overrides[f]``, else ``2 ** -(8 x bytes per weight)``."""
    out = {f: 2.0 ** -(8.0 * BYTES_PER_PARAM[f]) for f in formats}
    if overrides:
        out.update({f: float(v) for f, v in overrides.items() if f in out})
    return out


def _hull(nbytes: np.ndarray, err: np.ndarray) -> list:
    """Candidate indices on the lower convex hull of (bytes, error), cheapest first: the formats the
    greedy rule steps through (a format that removes less error per byte than a bigger one after
    it is jumped over)."""
    order = sorted(range(len(nbytes)), key=lambda i: (nbytes[i], err[i]))
    hull: list = []
    for i in order:
        if hull and err[i] >= err[hull[-1]]:
            continue  # no better than a cheaper one
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when the step a -> i removes at least as much error per byte as a -> b
            if (err[a] - err[i]) * (nbytes[b] - nbytes[a]) >= (err[a] - err[b]) * (nbytes[i] - nbytes[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def solve_greedy(importance, nbytes, err, budget: int) -> np.ndarray:
    """Greedy assignment: candidate index per item. Every item starts at the cheapest format; the
    step (along the convex hull of the formats) with the most importance x error removed per byte
    is taken next while it fits in ``budget`` bytes; an item whose next step does not fit stops.
    Ties go to the more important item, then the lower index."""
    imp = np.asarray(importance, dtype=np.float64)
    nb = np.asarray(nbytes, dtype=np.int64)
    er = np.asarray(err, dtype=np.float64)
    hull = _hull(nb, er)
    n = imp.size
    pos = np.zeros(n, dtype=np.int64)
    left = int(budget) - int(nb[hull[0]]) * n
    if left < 0:
        raise ValueError("budget below the cheapest assignment")
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((np.arange(n), -imp))] = np.arange(n)
    steps = [(int(nb[hull[j + 1]] - nb[hull[j]]), float(er[hull[j]] - er[hull[j + 1]])) for j in range(len(hull) - 1)]
    heap = []
    if steps:
        db, de = steps[0]
        heap = [(-(imp[i] * de / db), int(rank[i]), i) for i in range(n)]
        heapq.heapify(heap)
    while heap:
        _, r, i = heapq.heappop(heap)
        db, de = steps[pos[i]]
        if db > left:
            continue
        left -= db
        pos[i] += 1
        if pos[i] < len(steps):
            db, de = steps[pos[i]]
            heapq.heappush(heap, (-(imp[i] * de / db), r, i))
    return np.asarray(hull, dtype=np.int64)[pos]


def solve_exact(importance, nbytes, err, budget: int, limit: int = EXACT_LIMIT) -> np.ndarray:
    """Minimum of sum(importance x error) with total bytes <= ``budget``: candidate index per item.
    Items share one size per format, so only the count per format matters to the bytes, and for
    given counts the lowest-error formats go to the most important items (rearrangement); every
    count vector is tried. Ties: fewer bytes, then the first count vector found."""
    imp = np.asarray(importance, dtype=np.float64)
    nb = np.asarray(nbytes, dtype=np.int64)
    er = np.asarray(err, dtype=np.float64)
    n, F = imp.size, nb.size
    fo = sorted(range(F), key=lambda f: (er[f], nb[f]))  # lowest error first
    combos = math.comb(n + F - 1, F - 1)
    if combos > limit:
        raise ValueError(f"exact search over {combos} count vectors ({n} experts, {F} formats) is too large; "
                         "use solver: greedy")
    order = np.lexsort((np.arange(n), -imp))  # most important first
    S = np.concatenate([[0.0], np.cumsum(imp[order])])
    if F == 1:
        cuts = np.zeros((1, 0), dtype=np.int64)
    else:
        cuts = np.array(list(itertools.combinations_with_replacement(range(n + 1), F - 1)), dtype=np.int64)
    bounds = np.hstack([np.zeros((len(cuts), 1), np.int64), cuts, np.full((len(cuts), 1), n, np.int64)])
    counts = np.diff(bounds, axis=1)  # [V, F] in fo order
    used = counts @ nb[fo]
    loss = (S[bounds[:, 1:]] - S[bounds[:, :-1]]) @ er[fo]
    ok = used <= budget
    if not ok.any():
        raise ValueError("budget below the cheapest assignment")
    idx = np.flatnonzero(ok)
    best = idx[np.lexsort((used[idx], loss[idx]))[0]]
    pick = np.empty(n, dtype=np.int64)
    for j, f in enumerate(fo):
        pick[order[bounds[best, j]:bounds[best, j + 1]]] = f
    return pick
