"""ARC: against the paper's algorithm (Megiddo & Modha 2003, Fig. 4) on one-expert-per-access
traces, and against a plain-list reference of moesim's adaptation on general traces."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.engine.plan import build_plan
from moesim.policies.cache.base import CacheSetup

from moesim.policies.cache.arc import Arc

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


def textbook_arc(requests, c):
    """ARC exactly as the paper's pseudo-code, on a sequence of single keys: (hits, misses)."""
    T1, T2, B1, B2 = [], [], [], []  # least recent first
    p = 0.0
    hits = misses = 0

    def replace(x):
        if T1 and ((x in B2 and len(T1) == p) or len(T1) > p):
            B1.append(T1.pop(0))
        else:
            B2.append(T2.pop(0))

    for x in requests:
        if x in T1 or x in T2:  # case I
            hits += 1
            (T1 if x in T1 else T2).remove(x)
            T2.append(x)
            continue
        misses += 1
        if x in B1:  # case II
            p = min(p + (1.0 if len(B1) >= len(B2) else len(B2) / len(B1)), c)
            replace(x)
            B1.remove(x)
            T2.append(x)
        elif x in B2:  # case III
            p = max(p - (1.0 if len(B2) >= len(B1) else len(B1) / len(B2)), 0.0)
            replace(x)
            B2.remove(x)
            T2.append(x)
        else:  # case IV
            if len(T1) + len(B1) == c:
                if len(T1) < c:
                    B1.pop(0)
                    replace(x)
                else:
                    T1.pop(0)
            else:
                total = len(T1) + len(T2) + len(B1) + len(B2)
                if total >= c:
                    if total == 2 * c:
                        B2.pop(0)
                    replace(x)
            T1.append(x)
    return hits, misses


def reference_arc(steps, C, capacity, scope):
    """Plain-list ARC with moesim's adaptation (protect set, streaming, directory trimming)."""
    _, pool_of, c = ref_pools(C, capacity, scope)
    S = {}
    hits = misses = evictions = streamed = 0
    for step in steps:
        for col, needed in enumerate(step):
            st_ = S.setdefault(pool_of(col), {"T1": [], "T2": [], "B1": [], "B2": [], "p": 0.0})
            T1, T2, B1, B2 = st_["T1"], st_["T2"], st_["B1"], st_["B2"]
            keys = [(col, e) for e in needed]
            hit = [k for k in keys if k in T1 or k in T2]
            for k in hit:
                hits += 1
                (T1 if k in T1 else T2).remove(k)
                T2.append(k)
            for k in keys:
                if k in hit:
                    continue
                misses += 1
                from_b2 = drop = False
                if k in B1:
                    st_["p"] = min(float(c), st_["p"] + max(1.0, len(B2) / len(B1)))
                    dest = T2
                elif k in B2:
                    st_["p"] = max(0.0, st_["p"] - max(1.0, len(B1) / len(B2)))
                    from_b2 = True
                    dest = T2
                else:
                    if len(T1) + len(B1) >= c:
                        if len(T1) < c:
                            if B1:
                                B1.pop(0)
                        else:
                            drop = True
                    elif len(T1) + len(T2) + len(B1) + len(B2) >= 2 * c and B2:
                        B2.pop(0)
                    dest = T1
                if len(T1) + len(T2) >= c:
                    p = st_["p"]
                    prefer_t1 = T1 and (len(T1) > p or (from_b2 and len(T1) == p))
                    order = (T1, T2) if prefer_t1 else (T2, T1)
                    victim, src = None, None
                    for lst in order:
                        cand = [v for v in lst if v not in keys]
                        if cand:
                            victim, src = cand[0], lst
                            break
                    if victim is None:
                        streamed += 1
                        continue
                    src.remove(victim)
                    evictions += 1
                    if src is T1:
                        if not drop:
                            B1.append(victim)
                    else:
                        B2.append(victim)
                    while len(T1) + len(B1) > c and B1:
                        B1.pop(0)
                    while len(T1) + len(T2) + len(B1) + len(B2) > 2 * c and (B1 or B2):
                        (B2 if B2 else B1).pop(0)
                for g in (B1, B2):
                    if k in g:
                        g.remove(k)
                dest.append(k)
    return hits, misses, evictions, streamed


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.lists(st.integers(0, 11), min_size=1, max_size=120))
def test_arc_equals_the_paper_on_single_key_requests(c, reqs):
    steps = [[[x]] for x in reqs]
    pol = Arc(Arc.Config(capacity_experts=c), make_setup(steps, 1, 12))
    h, m, _, s = run_counts(pol, steps)
    assert s == 0
    assert (h, m) == textbook_arc(reqs, c)
    for st_ in pol.arc.values():  # the paper's invariants
        assert len(st_.t1) + len(st_.b1) <= c
        assert len(st_.t1) + len(st_.t2) + len(st_.b1) + len(st_.b2) <= 2 * c
        assert 0.0 <= st_.p <= c


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_arc_matches_reference(w):
    steps, C, E, cap, scope = w
    pol = Arc(Arc.Config(capacity_experts=cap, scope=scope), make_setup(steps, C, E))
    assert run_counts(pol, steps) == reference_arc(steps, C, cap, scope)
    for st_ in pol.arc.values():
        assert len(st_.t1) + len(st_.t2) + len(st_.b1) + len(st_.b2) <= 2 * st_.c


def test_arc_scan_resistance():
    # a hot pair reused between one-off scans: ARC keeps it (T2), LRU loses it to the scan
    from moesim.policies.cache.lru import Lru

    seq = []
    nxt = 10
    for _ in range(20):
        seq += [[0], [1], [0], [1]]
        seq += [[nxt], [nxt + 1], [nxt + 2]]
        nxt += 3
    steps = [[x] for x in seq]
    setup = make_setup(steps, 1, nxt)
    arc = run_counts(Arc(Arc.Config(capacity_experts=3), setup), steps)
    lru = run_counts(Lru(Lru.Config(capacity_experts=3), setup), steps)
    assert arc[0] > lru[0]
