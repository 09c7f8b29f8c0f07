"""ExpertFlow PLEC: the path oracle protects predicted experts, the locality window orders the
rest; a brute-force reference on random traces."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.engine.plan import build_plan
from moesim.policies.cache.base import CacheSetup

from moesim.policies.cache.plec import ExpertFlowPlec

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


def reference_plec(steps, C, capacity, scope, lookahead, window, use_oracle):
    """Plain PLEC: predicted = needed later before the horizon; then window count; then LRU."""
    pools, pool_of, cap = ref_pools(C, capacity, scope)
    seq = [(c, needed) for step in steps for c, needed in enumerate(step)]
    hits = misses = evictions = streamed = 0
    for t, (c, needed) in enumerate(seq):
        horizon = (t // C + 1 + lookahead) * C
        recent = seq[max(t - window * C + 1, 0): t + 1]

        def order(key):
            col, e = key
            pred = use_oracle and any(cc == col and e in x for cc, x in seq[t:horizon])
            return (pred, sum(1 for cc, x in recent if cc == col and e in x))

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
                low = min(order(v) for v in cands)
                victim = next(v for v in cands if order(v) == low)
                rec.remove(victim)
                evictions += 1
            rec.append(k)
    return hits, misses, evictions, streamed


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
