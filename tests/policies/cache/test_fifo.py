"""FIFO against a brute-force reference of DESIGN 3.2's accounting, for both scopes."""

from __future__ import annotations

from hypothesis import given, settings

from moesim.policies.cache.fifo import Fifo
from tests.policies.cache.cachetest import make_setup, ref_access, ref_pools, run_counts, workloads


def reference_fifo(steps, C, capacity, scope):
    """Plain-list FIFO: arrival lists (oldest first), one per pool; hits change nothing."""
    pools, pool_of, cap = ref_pools(C, capacity, scope)
    counts = [0, 0, 0, 0]  # hits, misses, evictions, streamed
    for step in steps:
        for c, needed in enumerate(step):
            ref_access(pools[pool_of(c)], [(c, e) for e in needed], cap, counts, refresh=False)
    return tuple(counts)


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
