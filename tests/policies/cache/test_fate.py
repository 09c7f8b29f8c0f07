"""Fate: quota rule (sums, monotonicity, bounds), per-layer LRU/ARC against references."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.errors import InputError
from moesim.policies.cache.fate import Fate, fate_quotas
from tests.policies.cache.cachetest import make_setup, ref_access, run_counts, workloads


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
    counts = [0, 0, 0, 0]  # hits, misses, evictions, streamed
    for step in steps:
        for c, needed in enumerate(step):
            ref_access(pools[c], [(c, e) for e in needed], quotas[c], counts)
    return tuple(counts)


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
