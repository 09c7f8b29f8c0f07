"""Hit rate versus capacity without the timing engine: replay a cache policy's ``access`` over the
decode plan of a trace, exactly as the engine calls it, for several policies and capacities.

>>> from moesim.traces import synthesize
>>> tr = synthesize(num_tokens=32, layers=[0, 1], num_experts=4, top_k=2, seed=0)
>>> out = hit_curve(tr, ["lru", "belady"], [4, 8])
>>> [(r["policy"], r["capacity"]) for r in out["results"]]
[('lru', 4), ('lru', 8), ('belady', 4), ('belady', 8)]
>>> out["results"][1]["misses"]  # 8 slots hold all 2 x 4 experts: only first touches miss
8
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from moesim.errors import InputError, pydantic_error_line
from moesim.policies.cache.base import CacheSetup

SOURCE = "moesim trace cache-curve"


def curve_setup(trace, *, batch_size: int = 1, max_tokens: int | None = None, loop_trace: bool = False,
                model=None, source: str = SOURCE) -> CacheSetup:
    """The :class:`CacheSetup` the engine would build for ``trace`` (plan included).

    Without ``model`` the trace's columns are the simulated MoE layers (experts per layer and top-k
    from the trace, expert size 1 byte, so capacities are in slots). With ``model`` (a ModelSpec)
    its MoE layers are simulated and uncovered layers borrow the nearest traced column, as in a run.
    """
    from moesim.engine.build import map_columns
    from moesim.engine.plan import build_plan

    experts = np.asarray(trace.experts)
    T, L, K = experts.shape
    trace_layers = trace.layers or tuple(range(L))
    if model is not None:
        model_layers, col_src, _ = map_columns(model, tuple(trace_layers))
        E, top_k, xb = model.num_experts, model.top_k, model.expert_bytes
    else:
        model_layers, col_src = list(trace_layers), list(range(L))
        E, top_k, xb = trace.num_experts, K, 1
    if batch_size < 1:
        raise InputError(f"expected a positive batch size, got {batch_size}", source=source, field="batch_size")
    if max_tokens is not None and max_tokens < 1:
        raise InputError(f"expected a positive token count, got {max_tokens}", source=source, field="max_tokens")
    try:
        plan = build_plan(experts, batch_size=batch_size, max_tokens=T if max_tokens is None else max_tokens,
                          loop_trace=loop_trace)
    except ValueError as exc:
        raise InputError(str(exc), source=source, field="batch_size") from None
    return CacheSetup(
        num_columns=len(model_layers),
        num_experts=E,
        expert_bytes=xb,
        top_k=top_k,
        model_layers=tuple(model_layers),
        max_distinct_per_step=plan.max_distinct,
        source=source,
        plan=plan,
        col_src=tuple(col_src),
        experts=experts,
        weights=None if trace.weights is None else np.asarray(trace.weights),
        batch_size=batch_size,
    )


def make_cache(kind: str, capacity: int, setup: CacheSetup, *, scope: str = "global", source: str = SOURCE, **extra):
    """Build the registered cache policy ``kind`` with ``capacity`` expert slots (InputError on a bad
    kind, capacity or field)."""
    from pydantic import ValidationError

    from moesim.policies.base import registry

    reg = registry("cache")
    if kind not in reg:
        raise InputError(f"unknown cache policy {kind!r}; valid: {', '.join(sorted(reg))}", source=source,
                         field="policies")
    cls = reg[kind]
    fields = cls.Config.model_fields
    raw = {"kind": kind, **extra}
    if "capacity_experts" in fields:
        raw["capacity_experts"] = capacity
    if "scope" in fields:
        raw["scope"] = scope
    try:
        cfg = cls.Config.model_validate(raw)
    except ValidationError as exc:
        raise pydantic_error_line(exc, source=source, prefix=kind) from None
    return cls(cfg, setup)


def replay(cache, setup: CacheSetup, *, warmup_steps: int = 0) -> dict:
    """Serve every (step, layer) of ``setup.plan`` through ``cache.access`` in the engine's order and
    count hits, misses, streamed misses and evictions (steps before ``warmup_steps`` not counted)."""
    plan = setup.plan
    C = setup.num_columns
    src = setup.col_src
    access = cache.access
    hits = misses = streamed = evictions = 0
    t = 0
    for s in range(plan.steps):
        measured = s >= warmup_steps
        for c in range(C):
            r = access(c, plan.row(s, src[c])[0], t)
            t += 1
            if measured:
                nh = len(r.hits)
                ns = len(r.streamed)
                hits += nh
                misses += len(r.loads) + ns
                streamed += ns
                for _, ev in r.loads:
                    evictions += len(ev)
    acc = hits + misses
    return {
        "hits": hits,
        "misses": misses,
        "accesses": acc,
        "hit_rate": hits / acc if acc else None,
        "streamed": streamed,
        "evictions": evictions,
    }


def _parse_trace(trace_or_path, source):
    from moesim.traces import load_trace

    if isinstance(trace_or_path, (str, os.PathLike)):
        return load_trace(trace_or_path)
    if not hasattr(trace_or_path, "experts"):
        raise InputError("expected a trace or a trace path", source=source)
    return trace_or_path


def hit_curve(
    trace_or_path,
    kinds: Iterable[str],
    capacities: Iterable[int],
    scope: str = "global",
    batch_size: int = 1,
    *,
    max_tokens: int | None = None,
    warmup_tokens: int = 0,
    loop_trace: bool = False,
    model=None,
    source: str = SOURCE,
) -> dict:
    """Hits, misses and hit rate of each cache policy ``kind`` at each ``capacity`` (expert slots,
    the whole cache; ``per_layer`` splits it equally) on the trace, without timing.

    Returns ``{"trace", "scope", "batch_size", "steps", "layers", "results": [{"policy",
    "capacity", "hits", "misses", "accesses", "hit_rate", "streamed", "evictions"}, ...]}`` with
    the results policy-major in the order given. Counts equal a run's ``cache`` counters for the
    same trace, model layers, policy, capacity, batch size, token budget and warm-up.
    """
    kinds = [str(k).strip() for k in kinds]
    caps = list(capacities)
    if not kinds or any(not k for k in kinds):
        raise InputError("expected a comma-separated list of cache policies", source=source, field="policies")
    if not caps:
        raise InputError("expected at least one capacity", source=source, field="capacities")
    for c in caps:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
            raise InputError(f"expected positive integer capacities (expert slots), got {c!r}", source=source,
                             field="capacities")
    if scope not in ("global", "per_layer"):
        raise InputError(f"expected global or per_layer, got {scope!r}", source=source, field="scope")
    trace = _parse_trace(trace_or_path, source)
    setup = curve_setup(trace, batch_size=batch_size, max_tokens=max_tokens, loop_trace=loop_trace, model=model,
                        source=source)
    warm_steps = warmup_tokens // batch_size
    if warmup_tokens < 0 or (warm_steps and warm_steps >= setup.plan.steps):
        raise InputError(f"warm-up of {warm_steps} steps leaves nothing to measure in {setup.plan.steps} steps",
                         source=source, field="warmup_tokens")
    results = []
    for kind in kinds:
        for cap in caps:
            cache = make_cache(kind, int(cap), setup, scope=scope, source=source)
            row = {"policy": kind, "capacity": int(cap)}
            row.update(replay(cache, setup, warmup_steps=warm_steps))
            results.append(row)
    return {
        "trace": str(trace_or_path) if isinstance(trace_or_path, (str, os.PathLike)) else None,
        "scope": scope,
        "batch_size": batch_size,
        "steps": setup.plan.steps,
        "layers": setup.num_columns,
        "results": results,
    }


def curve_figure(curve: dict):
    """A plotly figure of hit rate (%) versus capacity (expert slots), one line per policy."""
    import plotly.graph_objects as go

    fig = go.Figure()
    by_kind: dict = {}
    for r in curve["results"]:
        by_kind.setdefault(r["policy"], []).append(r)
    for kind, rows in by_kind.items():
        rows = sorted(rows, key=lambda r: r["capacity"])
        fig.add_trace(go.Scatter(
            x=[r["capacity"] for r in rows],
            y=[None if r["hit_rate"] is None else 100 * r["hit_rate"] for r in rows],
            mode="lines+markers",
            name=kind,
        ))
    fig.update_layout(
        title=f"Expert-cache hit rate vs capacity ({curve['scope']}, batch {curve['batch_size']}, "
              f"{curve['steps']} steps)",
        xaxis_title="capacity (expert slots)",
        yaxis_title="hit rate (%)",
    )
    return fig
