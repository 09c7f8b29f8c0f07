"""ExpertFlow PLEC: the path oracle protects predicted experts, the locality window orders the
rest; a brute-force reference on random traces."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.policies.cache.plec import ExpertFlowPlec
from tests.policies.cache.cachetest import lowest, make_setup, ref_access, ref_pools, run_counts, workloads


def reference_plec(steps, C, capacity, scope, lookahead, window, use_oracle):
    """Plain PLEC: predicted = needed later before the horizon; then window count; then LRU."""
    pools, pool_of, cap = ref_pools(C, capacity, scope)
    seq = [(c, needed) for step in steps for c, needed in enumerate(step)]
    counts = [0, 0, 0, 0]  # hits, misses, evictions, streamed
    for t, (c, needed) in enumerate(seq):
        horizon = (t // C + 1 + lookahead) * C
        recent = seq[max(t - window * C + 1, 0): t + 1]

        def order(key):
            col, e = key
            pred = use_oracle and any(cc == col and e in x for cc, x in seq[t:horizon])
            return (pred, sum(1 for cc, x in recent if cc == col and e in x))

        ref_access(pools[pool_of(c)], [(c, e) for e in needed], cap, counts, lowest(order))
    return tuple(counts)


@settings(max_examples=100, deadline=None)
@given(workloads(max_steps=25), st.integers(0, 2), st.integers(1, 5), st.booleans())
def test_plec_matches_reference(w, lookahead, window, oracle):
    steps, C, E, cap, scope = w
    p = ExpertFlowPlec(ExpertFlowPlec.Config(capacity_experts=cap, scope=scope, lookahead_steps=lookahead,
                                             window_steps=window, predictor="oracle" if oracle else "none"),
                       make_setup(steps, C, E))
    assert run_counts(p, steps) == reference_plec(steps, C, cap, scope, lookahead, window, oracle)


def test_predicted_expert_of_a_later_layer_is_kept():
    # 2 layers x 4 experts, one global pool of 3 slots. Before step 2 the pool holds key 0
    # (layer 0, expert 0: used twice, last at t=2), key 5 (layer 1, expert 1: once, t=1) and key 6
    # (layer 1, expert 2: once, t=3). Step 2's layer 0 needs expert 3; its layer 1 needs expert 1.
    steps = [[[0], [1]], [[0], [2]], [[3], [1]]]
    seq = [(c, x) for step in steps for c, x in enumerate(step)]

    def last_loads(predictor):
        p = ExpertFlowPlec(ExpertFlowPlec.Config(capacity_experts=3, predictor=predictor), make_setup(steps, 2, 4))
        return [p.access(c, x, t) for t, (c, x) in enumerate(seq)][4].loads

    assert last_loads("oracle") == [(3, [6])]  # 5 is on the current path: 6 (fewer uses than 0) goes
    assert last_loads("none") == [(3, [5])]  # locality only: 5 and 6 used once, 5 less recently
