"""ARC: against the paper's algorithm (Megiddo & Modha 2003, Fig. 4) on one-expert-per-access
traces, and against a plain-list reference of moesim's adaptation on general traces."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.policies.cache.arc import Arc
from tests.policies.cache.cachetest import make_setup, ref_pools, run_counts, workloads


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
