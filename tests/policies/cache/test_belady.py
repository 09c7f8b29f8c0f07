"""Belady: against a brute-force reference that scans the future, and the paper-level claim that
with equal expert sizes no online policy gets more hits at the same capacity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.errors import InputError
from moesim.policies.base import registry
from moesim.policies.cache.base import CacheSetup
from moesim.policies.cache.belady import Belady
from tests.policies.cache.cachetest import lowest, make_setup, ref_access, ref_pools, run_counts, workloads


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

    counts = [0, 0, 0, 0]  # hits, misses, evictions, streamed
    for t, (c, needed) in enumerate(seq):
        farthest = lowest(lambda v: -next_use(v, t))  # the farthest next use; least recent on ties
        ref_access(pools[pool_of(c)], [(c, e) for e in needed], cap, counts, farthest)
    return tuple(counts)


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
