"""MoE-Infinity: keeps the window's hot experts, forgets activity older than the window, layer
weighting, and a brute-force reference on random traces."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.policies.cache.moe_infinity import MoeInfinity
from tests.policies.cache.cachetest import lowest, make_setup, ref_access, ref_pools, run_counts, workloads


def reference_moe_infinity(steps, C, E, capacity, scope, window, layer_aware):
    """Plain version: window counts recomputed from scratch at every decision."""
    pools, pool_of, cap = ref_pools(C, capacity, scope)
    seq = [(c, needed) for step in steps for c, needed in enumerate(step)]
    counts = [0, 0, 0, 0]  # hits, misses, evictions, streamed
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

        ref_access(pools[pool_of(c)], [(c, e) for e in needed], cap, counts, lowest(prio))
    return tuple(counts)


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
