"""Fate: quota rule (sums, monotonicity, bounds), per-layer LRU/ARC against references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.engine.plan import build_plan
from moesim.errors import InputError
from moesim.policies.cache.base import CacheSetup

from moesim.policies.cache.fate import Fate, fate_quotas

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


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 16), st.integers(1, 4), st.floats(1.0, 8.0), st.integers(0, 400))
def test_quotas_sum_monotone_and_bounded(L, E, k, ratio, extra):
    k = min(k, E)
    total = k * L + extra
    q = fate_quotas(total, L, E, k, ratio)
    assert len(q) == L
    assert sum(q) == min(total, L * E)
    assert all(k <= x <= E for x in q)
    assert all(a >= b for a, b in zip(q, q[1:]))  # shallow layers never get less


def test_quotas_follow_the_ratio():
    q = fate_quotas(2 * 4 + 30, 4, 64, 2, 2.0)  # 30 extra slots, weights 2, 5/3, 4/3, 1
    # shares 10, 8.33, 6.67, 5 -> floors 10, 8, 6, 5 and the leftover slot to the first layer
    assert q == [2 + 11, 2 + 8, 2 + 6, 2 + 5]
    assert fate_quotas(40, 4, 64, 2, 1.0) == [10, 10, 10, 10]  # ratio 1: equal split


def test_fate_pools_and_errors():
    setup = make_setup([[[0], [0], [0]]], 3, 8, top_k=2)
    f = Fate(Fate.Config(capacity_experts=12, shallow_ratio=3.0), setup)
    assert f.quotas() == fate_quotas(12, 3, 8, 2, 3.0) and sum(f.quotas()) == 12
    assert f.quotas()[0] > f.quotas()[-1]
    with pytest.raises(InputError, match="top_k"):
        Fate(Fate.Config(capacity_experts=5), setup)
    w = Fate(Fate.Config(capacity_experts=12, warm_start="first"), setup)
    assert [len(p.order) for p in w.pools] == w.quotas()
    assert all(k // 8 == p.index for p in w.pools for k in p.order)


def reference_per_layer_lru(steps, quotas):
    """Plain LRU with one pool per column of the given sizes."""
    pools = {c: [] for c in range(len(quotas))}
    hits = misses = evictions = streamed = 0
    for step in steps:
        for c, needed in enumerate(step):
            rec = pools[c]
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
                if len(rec) >= quotas[c]:
                    v = next((v for v in rec if v not in keys), None)
                    if v is None:
                        streamed += 1
                        continue
                    rec.remove(v)
                    evictions += 1
                rec.append(k)
    return hits, misses, evictions, streamed


@settings(max_examples=100, deadline=None)
@given(workloads(), st.floats(1.0, 4.0))
def test_fate_lru_matches_per_layer_reference(w, ratio):
    steps, C, E, cap, _ = w
    cap = max(cap, C)
    f = Fate(Fate.Config(capacity_experts=cap, shallow_ratio=ratio, within_layer="lru"), make_setup(steps, C, E))
    assert run_counts(f, steps) == reference_per_layer_lru(steps, f.quotas())


@settings(max_examples=60, deadline=None)
@given(workloads())
def test_fate_arc_equals_per_layer_arc_at_equal_quotas(w):
    from moesim.policies.cache.arc import Arc

    steps, C, E, cap, _ = w
    per = max(cap // C, 1)
    setup = make_setup(steps, C, E)
    f = Fate(Fate.Config(capacity_experts=per * C, shallow_ratio=1.0), setup)
    a = Arc(Arc.Config(capacity_experts=per * C, scope="per_layer"), make_setup(steps, C, E))
    assert run_counts(f, steps) == run_counts(a, steps)
