"""FIFO against a brute-force reference of DESIGN 3.2's accounting, for both scopes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.engine.plan import build_plan
from moesim.policies.cache.base import CacheSetup

from moesim.policies.cache.fifo import Fifo

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


def reference_fifo(steps, C, capacity, scope):
    """Plain-list FIFO: arrival lists (oldest first), one per pool; hits change nothing."""
    pools, pool_of, cap = ref_pools(C, capacity, scope)
    hits = misses = evictions = streamed = 0
    for step in steps:
        for c, needed in enumerate(step):
            q = pools[pool_of(c)]
            keys = [(c, e) for e in needed]
            hit = [k for k in keys if k in q]
            hits += len(hit)
            for k in keys:
                if k in hit:
                    continue
                misses += 1
                if len(q) >= cap:
                    victim = next((v for v in q if v not in keys), None)
                    if victim is None:
                        streamed += 1
                        continue
                    q.remove(victim)
                    evictions += 1
                q.append(k)
    return hits, misses, evictions, streamed


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_fifo_matches_reference(w):
    steps, C, E, cap, scope = w
    pol = Fifo(Fifo.Config(capacity_experts=cap, scope=scope), make_setup(steps, C, E))
    assert run_counts(pol, steps) == reference_fifo(steps, C, cap, scope)


def test_fifo_hit_does_not_refresh():
    setup = make_setup([[[0]]], 1, 4)
    f = Fifo(Fifo.Config(capacity_experts=2), setup)
    f.access(0, [0], 0)
    f.access(0, [1], 1)
    f.access(0, [0], 2)  # hit: 0 stays oldest
    r = f.access(0, [2], 3)
    assert r.loads == [(2, [0])]


def test_fifo_warm_start_order():
    setup = make_setup([[[0], [0]]], 2, 4)
    f = Fifo(Fifo.Config(capacity_experts=3, warm_start={1: [3, 1]}), setup)
    assert list(f.pools[0].order) == [7, 5]
    f.access(0, [2], 0)
    assert f.access(0, [0], 1).loads == [(0, [7])]
