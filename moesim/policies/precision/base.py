"""The precision-policy interface.

A precision policy offers *levels*: level 0 is the model's own expert dtype, levels 1, 2, ... are
cheaper copies (fewer bytes over the link, their own kernel time, a smaller cache entry). For every
(step, layer) the engine hands the policy the layer's missing experts and its resident ones, each
with its mean gate weight, and the policy answers with a level (or a skip: no load, no kernel) for
each miss and, optionally, a *top-up* for resident experts held at a cheaper level (load the bytes
that take the resident copy to a better level, as nested bit-slices allow). Resident experts run at
the level they hold. The engine reports bytes, kernel time and gate mass per format in
``summary.json`` (``precision.by_format``), the gate mass served below level 0 or skipped being the
quality proxy.

A simple policy implements :meth:`PrecisionPolicy.decide` (``"full"``, ``"low"`` or ``"skip"`` per
miss, with one ``low_dtype``); a richer one overrides :meth:`levels` and :meth:`plan_layer`. A policy
that fixes each expert's format ahead of the run (EdgeMoE) also overrides :meth:`prefetch_level`, so
that prefetched copies load at that format too, and may add figures to ``summary.json`` through
:meth:`report`.
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.policies.base import Policy


@dataclass(frozen=True)
class Level:
    """One precision level of an expert copy.

    ``name``: the format reported in ``summary.json``; ``bytes_per_param``: storage per weight
    (scales included); ``dtype``: a format of the dtype tables (kernel time by its own roofline) or
    None with ``math_dtype`` (a format outside the tables, e.g. a bit-slice depth)."""

    name: str
    bytes_per_param: float
    dtype: str | None = None
    math_dtype: str | None = None


class PrecisionPolicy(Policy):
    """Base of precision policies."""

    family = "precision"
    low_dtype: str | None = None  # the lower-precision format of a two-level policy

    def __init__(self, config, setup=None):
        super().__init__(config)
        self.setup = setup

    def levels(self, model) -> list[Level]:
        """The levels this policy loads, level 0 = ``model``'s expert dtype."""
        from moesim.models.spec import BYTES_PER_PARAM

        full = model.expert_dtype or model.dtype
        out = [Level(full, BYTES_PER_PARAM[full], full)]
        if self.low_dtype is not None:
            out.append(Level(self.low_dtype, BYTES_PER_PARAM[self.low_dtype], self.low_dtype))
        return out

    def decide(self, column: int, expert: int, weight: float) -> str:
        """``"full"``, ``"low"`` or ``"skip"`` for a missing expert with mean gate ``weight``."""
        return "full"

    def plan_layer(self, column: int, misses: list, resident: list) -> tuple[dict, dict]:
        """Levels for one (step, layer). ``misses``: ``[(expert, mean gate weight)]`` of missing
        experts, ``resident``: ``[(expert, weight, held level)]``, both in first-appearance order.
        Returns ``({expert: level or None (skip)}`` for every miss, ``{expert: level}`` for resident
        experts to top up to a better (lower) level)."""
        out = {}
        for e, w in misses:
            d = self.decide(column, e, w)
            out[e] = None if d == "skip" else (1 if d == "low" else 0)
        return out, {}

    def prefetch_level(self, column: int, expert: int) -> int:
        """The level a prefetched copy of ``(column, expert)`` is loaded at (default 0: the model's
        expert dtype; a policy with a fixed format per expert, e.g. EdgeMoE, returns that one)."""
        return 0

    def report(self) -> dict:
        """The policy's own figures for ``summary.json``'s ``precision`` block (none by default)."""
        return {}


def grow(cache, column: int, key: int, new_bytes: int, protect) -> tuple[bool, list]:
    """Enlarge resident ``key``'s cache entry to ``new_bytes`` (a top-up), evicting the cache
    policy's victims (never one in ``protect``) until it fits. Returns (grown, evicted keys); when
    no room can be made the entry keeps its size, and keys already evicted stay evicted."""
    pool = cache.pool_of_column[column]
    extra = new_bytes - cache.key_bytes[key]
    if new_bytes > pool.capacity_bytes:
        return False, []
    fits, evicted = cache.make_room(pool, extra, protect)
    if fits:
        pool.used_bytes += extra
        cache.key_bytes[key] = new_bytes
    return fits, evicted


@dataclass
class PrecisionRun:
    """What the engine needs of a precision policy, per level: bytes of one copy, its copy time
    (seconds, at the run's host-memory setting), kernel time by token count (seconds), plus the
    mean-gate-weight function ``mean_weight(step, column, experts, counts) -> {expert: weight}``."""

    policy: PrecisionPolicy
    names: list
    nbytes: list
    copy_s: list
    texp: list
    mean_weight: object


def precision_run(policy, model, predictor, link, *, pinned: bool, kernels: int, max_tokens: int, setup,
                  model_predictor=None) -> PrecisionRun:
    """Bind ``policy`` to a run: its levels' bytes, copy times and kernel times (token counts
    0..``max_tokens``) on ``predictor``'s GPU. A level whose format is in the dtype tables is
    predicted as the model with that expert dtype (``model_predictor(model)`` builds that
    predictor); a bit-slice depth by :meth:`~moesim.perf.predictor.Predictor.expert_times_as`."""
    import numpy as np

    levels = policy.levels(model)
    tok = np.arange(max_tokens + 1)
    names, nbytes, copy_s, texp = [], [], [], []
    for i, lv in enumerate(levels):
        if lv.dtype is not None:
            m = model if i == 0 else model.model_copy(update={"expert_dtype": lv.dtype})
            b = m.expert_bytes
            t, _ = (predictor if i == 0 else model_predictor(m)).expert_times(tok, kernels=kernels)
        else:
            b = int(round(model.expert_params * lv.bytes_per_param))
            t, _ = predictor.expert_times_as(tok, kernels, lv.name, bytes_per_param=lv.bytes_per_param,
                                             math_dtype=lv.math_dtype)
        names.append(lv.name)
        nbytes.append(b)
        copy_s.append(link.duration_s(b, "h2d", pinned=pinned))
        texp.append(t.tolist())
    policy.level_bytes = nbytes
    uniform = 1.0 / model.top_k

    def mean_weight(step, column, experts, counts):
        if setup.weights is None:
            return {e: uniform for e in experts}
        mass = setup.gate_mass(step, column)
        return {e: mass.get(e, 0.0) / n for e, n in zip(experts, counts)}

    return PrecisionRun(policy, names, nbytes, copy_s, texp, mean_weight)
