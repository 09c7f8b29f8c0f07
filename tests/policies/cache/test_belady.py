"""Belady: against a brute-force reference that scans the future, and the paper-level claim that
with equal expert sizes no online policy gets more hits at the same capacity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.engine.plan import build_plan
from moesim.errors import InputError
from moesim.policies.base import registry
from moesim.policies.cache.base import CacheSetup

from moesim.policies.cache.belady import Belady

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


def reference_belady(steps, C, capacity, scope):
    """Plain MIN: recency lists per pool; the victim's next use is found by scanning the future."""
    pools, pool_of, cap = ref_pools(C, capacity, scope)
    seq = [(c, needed) for step in steps for c, needed in enumerate(step)]  # index = access clock

    def next_use(key, t):
        for u in range(t, len(seq)):
            c, needed = seq[u]
            if c == key[0] and key[1] in needed:
                return u
        return float("inf")

    hits = misses = evictions = streamed = 0
    for t, (c, needed) in enumerate(seq):
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
                far = max(next_use(v, t) for v in cands)
                victim = next(v for v in cands if next_use(v, t) == far)  # least recent on ties
                rec.remove(victim)
                evictions += 1
            rec.append(k)
    return hits, misses, evictions, streamed


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_belady_matches_reference(w):
    steps, C, E, cap, scope = w
    pol = Belady(Belady.Config(capacity_experts=cap, scope=scope), make_setup(steps, C, E))
    assert run_counts(pol, steps) == reference_belady(steps, C, cap, scope)


ONLINE = sorted(set(registry("cache")) - {"streaming", "all_resident", "belady"})


def _policy(kind, cap, scope, setup):
    cls = registry("cache")[kind]
    return cls(cls.Config(capacity_experts=cap, scope=scope), setup)


@st.composite
def fitting_workloads(draw):
    """Random traces whose every (step, layer) fits in its pool (no streaming), any capacity."""
    C = draw(st.integers(1, 4))
    E = draw(st.integers(2, 8))
    k = draw(st.integers(1, min(E, 3)))
    n = draw(st.integers(1, 40))
    steps = [
        [draw(st.lists(st.integers(0, E - 1), min_size=1, max_size=k, unique=True)) for _ in range(C)]
        for _ in range(n)
    ]
    scope = draw(st.sampled_from(["global", "per_layer"]))
    per = draw(st.integers(k, E + 1))
    capacity = per * C if scope == "per_layer" else draw(st.integers(k, C * E + 1))
    weights = draw(st.lists(st.floats(0.01, 1.0), min_size=n * C * k, max_size=n * C * k))
    return steps, C, E, k, capacity, scope, np.array(weights).reshape(n, C, k)


@settings(max_examples=120, deadline=None)
@given(fitting_workloads())
def test_belady_never_beaten_by_an_online_policy(w):
    steps, C, E, k, cap, scope, weights = w
    setup = make_setup(steps, C, E, weights=weights, top_k=k)
    best = run_counts(_policy("belady", cap, scope, setup), steps)[0]
    # Fate splits the budget into its own per-layer quotas whatever the scope: any such split is
    # one way to use a global cache of the same total, so global Belady bounds it
    best_global = run_counts(_policy("belady", cap, "global", make_setup(steps, C, E, top_k=k)), steps)[0]
    for kind in ONLINE:
        if kind == "fate" and cap < k * C:
            continue  # Fate needs top_k slots in every layer (an input error otherwise)
        h = run_counts(_policy(kind, cap, scope, make_setup(steps, C, E, weights=weights, top_k=k)), steps)[0]
        assert h <= (best_global if kind == "fate" else best), (kind, h, best)


def test_belady_evicts_the_farthest_next_use():
    steps = [[[0]], [[1]], [[2]], [[1]], [[0]]]
    pol = Belady(Belady.Config(capacity_experts=2), make_setup(steps, 1, 3))
    r = [pol.access(0, s[0], t) for t, s in enumerate(steps)]
    assert r[2].loads == [(2, [0])]  # 0 is next needed at t=4, 1 at t=3
    assert r[3].hits == [1]


def test_belady_needs_the_plan():
    setup = CacheSetup(num_columns=1, num_experts=4, expert_bytes=10, top_k=1, model_layers=(0,),
                       max_distinct_per_step=1)
    with pytest.raises(InputError, match="plan"):
        Belady(Belady.Config(capacity_experts=2), setup)
