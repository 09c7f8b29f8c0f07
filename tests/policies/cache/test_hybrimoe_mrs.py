"""HybriMoE MRS against a brute-force reference (scores recomputed from the raw weight array)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.engine.plan import build_plan
from moesim.policies.cache.base import CacheSetup

from moesim.policies.cache.mrs import HybriMoeMrs

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


def reference_mrs(steps, C, E, weights, capacity, scope, alpha, top_p):
    """Plain MRS: S <- a*s + (1-a)*S for every expert of the layer, s from the weight array."""
    pools, pool_of, cap = ref_pools(C, capacity, scope)
    S = {}
    hits = misses = evictions = streamed = 0
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
                    low = min(S[v] for v in cands)
                    victim = next(v for v in cands if S[v] == low)
                    rec.remove(victim)
                    evictions += 1
                rec.append(k)
    return hits, misses, evictions, streamed


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
