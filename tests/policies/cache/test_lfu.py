"""LFU (both frequency modes) against a brute-force reference of DESIGN 3.2's accounting."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.engine.plan import build_plan
from moesim.policies.cache.base import CacheSetup

from moesim.policies.cache.lfu import Lfu

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


def reference_lfu(steps, C, capacity, scope, mode):
    """Plain LFU: resident lists per pool, use counts, and a recency stamp for ties."""
    pools, pool_of, cap = ref_pools(C, capacity, scope)
    freq, last = {}, {}
    clock = 0
    hits = misses = evictions = streamed = 0
    for step in steps:
        for c, needed in enumerate(step):
            res = pools[pool_of(c)]
            keys = [(c, e) for e in needed]
            if mode == "global":
                for k in keys:
                    freq[k] = freq.get(k, 0) + 1
            hit = [k for k in keys if k in res]
            for k in hit:
                hits += 1
                if mode == "resident":
                    freq[k] += 1
                clock += 1
                last[k] = clock
            for k in keys:
                if k in hit:
                    continue
                misses += 1
                if len(res) >= cap:
                    cands = [v for v in res if v not in keys]
                    if not cands:
                        streamed += 1
                        continue
                    victim = min(cands, key=lambda v: (freq[v], last[v]))
                    res.remove(victim)
                    evictions += 1
                    if mode == "resident":
                        del freq[victim]
                res.append(k)
                if mode == "resident":
                    freq[k] = 1
                clock += 1
                last[k] = clock
    return hits, misses, evictions, streamed


@settings(max_examples=150, deadline=None)
@given(workloads(), st.sampled_from(["global", "resident"]))
def test_lfu_matches_reference(w, mode):
    steps, C, E, cap, scope = w
    pol = Lfu(Lfu.Config(capacity_experts=cap, scope=scope, frequency=mode), make_setup(steps, C, E))
    assert run_counts(pol, steps) == reference_lfu(steps, C, cap, scope, mode)


def test_global_frequency_remembers_evicted_history():
    setup = make_setup([[[0]]], 1, 4)
    seq = [[0], [0], [0], [1], [2], [1], [0], [3]]
    outs = {}
    for mode in ("global", "resident"):
        p = Lfu(Lfu.Config(capacity_experts=2, frequency=mode), setup)
        outs[mode] = [p.access(0, x, t) for t, x in enumerate(seq)]
    # at [2]: 0 (3 uses) and 1 (1 use) resident -> 1 goes; at [1]: 0 vs 2 -> 2 goes (both modes)
    # at [0]: hit. At [3]: resident 0 (4 uses) and 1: global counts 1 twice, resident once -> 1 goes
    assert outs["global"][-1].loads == [(3, [1])]
    assert outs["resident"][-1].loads == [(3, [1])]
    # differing case: an expert evicted after many uses comes back
    seq = [[0]] * 3 + [[1]] * 4 + [[2], [2], [0], [3]]
    g = Lfu(Lfu.Config(capacity_experts=2, frequency="global"), setup)
    r = Lfu(Lfu.Config(capacity_experts=2, frequency="resident"), setup)
    rg = [g.access(0, x, t) for t, x in enumerate(seq)]
    rr = [r.access(0, x, t) for t, x in enumerate(seq)]
    assert rg[-2].loads == [(0, [2])] and rr[-2].loads == [(0, [2])]
    # before [3]: 1 has 4 uses; 0 has 4 over the run but 1 since it came back
    assert rg[-1].loads == [(3, [1])]  # global: tie 4/4 -> least recent (1) goes
    assert rr[-1].loads == [(3, [0])]  # resident: 0 (1 use) goes
