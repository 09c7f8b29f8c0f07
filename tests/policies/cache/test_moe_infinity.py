"""MoE-Infinity: keeps the window's hot experts, forgets activity older than the window, layer
weighting, and a brute-force reference on random traces."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.engine.plan import build_plan
from moesim.policies.cache.base import CacheSetup

from moesim.policies.cache.moe_infinity import MoeInfinity

# ---- shared helpers (kept in each policy test so that every file reads on its own) -------------


def make_setup(steps, C, E, weights=None, top_k=1):
    """A CacheSetup whose plan replays ``steps`` (per step, per column: distinct expert lists)."""
    K = max(len(x) for step in steps for x in step)
    ex = np.full((len(steps), C, K), -1, dtype=np.int64)
    for s, step in enumerate(steps):
        for c, needed in enumerate(step):
            ex[s, c, : len(needed)] = needed
    plan = build_plan(ex, batch_size=1, max_tokens=len(steps), loop_trace=False)
    return CacheSetup(num_columns=C, num_experts=E, expert_bytes=10, top_k=top_k,
                      model_layers=tuple(range(C)), max_distinct_per_step=plan.max_distinct,
                      plan=plan, col_src=tuple(range(C)), experts=ex, weights=weights, batch_size=1)


def run_counts(policy, steps):
    """(hits, misses, evictions, streamed) of ``policy`` over ``steps``, checking invariants."""
    C = len(steps[0])
    E = policy.E
    hits = misses = evictions = streamed = 0
    t = 0
    for step in steps:
        for c, needed in enumerate(step):
            r = policy.access(c, needed, t)
            t += 1
            hits += len(r.hits)
            misses += len(r.loads) + len(r.streamed)
            streamed += len(r.streamed)
            protect = {c * E + e for e in needed}
            for _, ev in r.loads:
                evictions += len(ev)
                assert not protect & set(ev), "evicted a key the step needs"
            for p in policy.pools:
                assert p.used_bytes <= p.capacity_bytes
                assert p.used_bytes == len(p.order) * 10
            for e in r.hits + [e for e, _ in r.loads]:
                assert c * E + e in policy.resident
    return hits, misses, evictions, streamed


@st.composite
def workloads(draw, max_steps=40):
    """Random traces: per step and column a list of distinct experts; a scope and a capacity."""
    C = draw(st.integers(1, 4))
    E = draw(st.integers(2, 8))
    n = draw(st.integers(1, max_steps))
    steps = [
        [draw(st.lists(st.integers(0, E - 1), min_size=1, max_size=min(E, 4), unique=True)) for _ in range(C)]
        for _ in range(n)
    ]
    scope = draw(st.sampled_from(["global", "per_layer"]))
    per = draw(st.integers(1, E + 1))
    capacity = per * C if scope == "per_layer" else draw(st.integers(1, C * E + 2))
    return steps, C, E, capacity, scope


def ref_pools(C, capacity, scope):
    """Reference pools: {pool id: resident list}, the pool of a column, slots per pool."""
    if scope == "global":
        return {0: []}, (lambda c: 0), capacity
    return {c: [] for c in range(C)}, (lambda c: c), capacity // C


def reference_moe_infinity(steps, C, E, capacity, scope, window, layer_aware):
    """Plain version: window counts recomputed from scratch at every decision."""
    pools, pool_of, cap = ref_pools(C, capacity, scope)
    seq = [(c, needed) for step in steps for c, needed in enumerate(step)]
    hits = misses = evictions = streamed = 0
    for t, (c, needed) in enumerate(seq):
        lo = t - window * C + 1
        recent = seq[max(lo, 0): t + 1]

        def prio(key):
            col, e = key
            tot = sum(len(x) for cc, x in recent if cc == col)
            n = sum(1 for cc, x in recent if cc == col and e in x)
            r = n / tot if tot else 0.0
            if layer_aware:
                d = (col - c) % C or C
                r *= 1.0 - (d - 1) / C
            return r

        rec = pools[pool_of(c)]
        keys = [(c, e) for e in needed]
        hit = [k for k in keys if k in rec]
        for k in hit:
            hits += 1
            rec.remove(k)
            rec.append(k)
        for k in keys:
            if k in hit:
                continue
            misses += 1
            if len(rec) >= cap:
                cands = [v for v in rec if v not in keys]
                if not cands:
                    streamed += 1
                    continue
                low = min(prio(v) for v in cands)
                victim = next(v for v in cands if prio(v) == low)
                rec.remove(victim)
                evictions += 1
            rec.append(k)
    return hits, misses, evictions, streamed


@settings(max_examples=100, deadline=None)
@given(workloads(max_steps=25), st.integers(1, 6), st.booleans())
def test_moe_infinity_matches_reference(w, window, layer_aware):
    steps, C, E, cap, scope = w
    p = MoeInfinity(MoeInfinity.Config(capacity_experts=cap, scope=scope, window_steps=window,
                                       layer_aware=layer_aware), make_setup(steps, C, E))
    assert run_counts(p, steps) == reference_moe_infinity(steps, C, E, cap, scope, window, layer_aware)


def test_keeps_the_windows_hot_experts():
    # expert 0 is hot in the window; 1..5 appear once each; capacity 2: 0 always stays
    seq = [[0], [1], [0], [2], [0], [3], [0], [4], [0], [5], [0]]
    steps = [[x] for x in seq]
    p = MoeInfinity(MoeInfinity.Config(capacity_experts=2, window_steps=8), make_setup(steps, 1, 6))
    loads = [p.access(0, x, t).loads for t, x in enumerate(seq)]
    assert all(0 not in ev for ld in loads for _, ev in ld)
    assert sum(1 for ld in loads for e, _ in ld if e == 0) == 1  # loaded once, hit afterwards


def test_forgets_activity_older_than_the_window():
    # 0 was hot long ago, 1 is hot now: with a short window 0 goes; with a long one 1 goes
    seq = [[0]] * 6 + [[1], [2], [1], [2], [1], [3]]
    steps = [[x] for x in seq]
    short = MoeInfinity(MoeInfinity.Config(capacity_experts=3, window_steps=4), make_setup(steps, 1, 4))
    long = MoeInfinity(MoeInfinity.Config(capacity_experts=3, window_steps=64), make_setup(steps, 1, 4))
    rs = [short.access(0, x, t) for t, x in enumerate(seq)]
    rl = [long.access(0, x, t) for t, x in enumerate(seq)]
    assert rs[-1].loads == [(3, [0])]
    assert rl[-1].loads == [(3, [2])]
