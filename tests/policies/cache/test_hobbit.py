"""HOBBIT: each weight alone picks the victim its dimension documents; invariants on random traces."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.engine.plan import build_plan
from moesim.policies.cache.base import CacheSetup

from moesim.policies.cache.hobbit import Hobbit

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


def _hobbit(setup, cap=3, **w):
    weights = {"w_recency": 0.0, "w_frequency": 0.0, "w_layer": 0.0, "w_precision": 0.0, **w}
    return Hobbit(Hobbit.Config(capacity_experts=cap, **weights), setup)


def test_each_weight_changes_the_victim_as_documented():
    # 4 layers, 2 experts each, one global pool of 3 slots; each part builds a resident set by hand
    setup = make_setup([[[0], [0], [0], [0]]], 4, 2)
    E = 2
    p = _hobbit(setup, w_recency=1.0)
    for t, (c, e) in enumerate([(0, 0), (1, 0), (2, 0), (0, 0), (0, 0)]):
        p.access(c, [e], t)
    # resident: (0,0) used 3x last at t=4, (1,0) once at t=1, (2,0) once at t=2
    assert p._victim(p.pools[0], set()) == 1 * E  # least recent: layer 1's expert
    q = _hobbit(setup, w_frequency=1.0)
    for t, (c, e) in enumerate([(1, 0), (2, 0), (0, 0), (0, 0), (2, 0)]):
        q.access(c, [e], t)
    assert q._victim(q.pools[0], set()) == 1 * E  # least used: layer 1's expert (once)
    r = _hobbit(setup, w_layer=1.0)
    for t, (c, e) in enumerate([(0, 0), (1, 0), (2, 0)]):
        r.access(c, [e], t)
    r._col = 1  # layer 1 just ran: layer 2 runs next (keep), then 0, and layer 1 last
    assert r._victim(r.pools[0], set()) == 1 * E
    r._col = 2  # layer 2 just ran: order of next runs 3, 0, 1, 2 -> layer 2's expert goes
    assert r._victim(r.pools[0], set()) == 2 * E


def test_precision_weight_alone_does_not_change_the_victim():
    steps = [[[0], [1]]] * 6
    setup = make_setup(steps, 2, 4)
    a = _hobbit(setup, cap=2, w_recency=1.0)
    b = _hobbit(setup, cap=2, w_recency=1.0, w_precision=5.0)
    seq = [(0, [0]), (1, [1]), (0, [2]), (1, [3]), (0, [0]), (1, [1])]
    ra = [a.access(c, x, t).loads for t, (c, x) in enumerate(seq)]
    rb = [b.access(c, x, t).loads for t, (c, x) in enumerate(seq)]
    assert ra == rb


@settings(max_examples=100, deadline=None)
@given(workloads(), st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=4, max_size=4))
def test_hobbit_invariants(w, ws):
    steps, C, E, cap, scope = w
    p = Hobbit(Hobbit.Config(capacity_experts=cap, scope=scope, w_recency=ws[0], w_frequency=ws[1],
                             w_layer=ws[2], w_precision=ws[3]), make_setup(steps, C, E))
    h, m, _, _ = run_counts(p, steps)
    assert h + m == sum(len(x) for step in steps for x in step)


def test_recency_only_hobbit_is_lru():
    from moesim.policies.cache.lru import Lru

    steps = [[[0, 1], [2]], [[3], [0]], [[1, 2], [1]], [[0], [3]], [[2], [2]], [[3], [1]]] * 3
    s1, s2 = make_setup(steps, 2, 4), make_setup(steps, 2, 4)
    assert run_counts(_hobbit(s1, cap=3, w_recency=1.0), steps) == run_counts(Lru(Lru.Config(capacity_experts=3), s2), steps)
