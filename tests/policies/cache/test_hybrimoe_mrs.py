"""HybriMoE MRS against a brute-force reference (scores recomputed from the raw weight array)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.policies.cache.mrs import HybriMoeMrs
from tests.policies.cache.cachetest import lowest, make_setup, ref_access, ref_pools, run_counts, workloads


def reference_mrs(steps, C, E, weights, capacity, scope, alpha, top_p):
    """Plain MRS: S <- a*s + (1-a)*S for every expert of the layer, s from the weight array."""
    pools, pool_of, cap = ref_pools(C, capacity, scope)
    S = {}
    counts = [0, 0, 0, 0]  # hits, misses, evictions, streamed
    for t_step, step in enumerate(steps):
        for c, needed in enumerate(step):
            s = {e: float(weights[t_step, c, i]) for i, e in enumerate(needed)}
            if top_p < 1.0:
                total = sum(s.values())
                kept, acc = {}, 0.0
                for e in sorted(s, key=lambda e: (-s[e], e)):
                    if acc >= top_p * total:
                        break
                    kept[e] = s[e]
                    acc += s[e]
                s = kept
            for e in range(E):
                S[(c, e)] = alpha * s.get(e, 0.0) + (1 - alpha) * S.get((c, e), 0.0)
            ref_access(pools[pool_of(c)], [(c, e) for e in needed], cap, counts, lowest(S.__getitem__))
    return tuple(counts)


@settings(max_examples=150, deadline=None)
@given(workloads(), st.sampled_from([0.5, 0.2, 1.0]), st.sampled_from([1.0, 0.6]), st.data())
def test_mrs_matches_reference(w, alpha, top_p, data):
    steps, C, E, cap, scope = w
    K = max(len(x) for step in steps for x in step)
    flat = data.draw(st.lists(st.floats(0.01, 1.0), min_size=len(steps) * C * K, max_size=len(steps) * C * K))
    weights = np.array(flat).reshape(len(steps), C, K)
    setup = make_setup(steps, C, E, weights=weights)
    pol = HybriMoeMrs(HybriMoeMrs.Config(capacity_experts=cap, scope=scope, alpha=alpha, top_p=top_p), setup)
    assert run_counts(pol, steps) == reference_mrs(steps, C, E, weights, cap, scope, alpha, top_p)


def test_mrs_default_alpha_and_decay():
    steps = [[[0, 1]], [[2, 1]], [[3, 1]]]
    w = np.array([[[0.9, 0.1]], [[0.6, 0.4]], [[0.5, 0.5]]])
    pol = HybriMoeMrs(HybriMoeMrs.Config(capacity_experts=3), make_setup(steps, 1, 4, weights=w))
    assert pol.config.alpha == 0.5
    pol.access(0, [0, 1], 0)
    assert pol.score == {0: 0.45, 1: 0.05, 2: 0.0, 3: 0.0}
    pol.access(0, [2, 1], 1)  # 0 decays to 0.225, 2 gets 0.3, 1 gets 0.225
    assert abs(pol.score[0] - 0.225) < 1e-12 and abs(pol.score[2] - 0.3) < 1e-12
    r = pol.access(0, [3, 1], 2)  # 0 (0.1125) is the lowest unprotected score
    assert r.loads == [(3, [0])]
