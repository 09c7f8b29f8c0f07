"""Shared helpers of the cache-policy tests: a plan-backed CacheSetup, a policy driver that checks
invariants, random workloads, and the building blocks of the plain-list reference policies.

Not named ``test_*``, so pytest does not collect it; the policy tests import it as
``tests.policies.cache.cachetest``.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from moesim.engine.plan import build_plan
from moesim.policies.cache.base import CacheSetup


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


def least_recent(cands):
    """The default reference victim: the first candidate, i.e. the least recent (or oldest)."""
    return cands[0]


def lowest(key):
    """A reference victim rule: the candidate with the lowest ``key``, the least recent on ties."""

    def pick(cands):
        """The first of ``cands`` whose ``key`` is the lowest."""
        low = min(key(v) for v in cands)
        return next(v for v in cands if key(v) == low)

    return pick


def ref_access(rec, keys, cap, counts, victim=least_recent, refresh=True):
    """One column's access in a plain-list reference policy, adding to ``counts`` in place.

    ``rec`` is a pool's resident list (least recent or oldest first) of at most ``cap`` keys,
    ``keys`` the (column, expert) keys the access needs, ``counts`` the running
    [hits, misses, evictions, streamed]. Hits move to the recent end when ``refresh`` (FIFO: not).
    Each miss loads its key, first evicting ``victim(cands)`` when the pool is full, where ``cands``
    are the resident keys the access does not need, in ``rec``'s order; with no candidate the key
    is streamed instead.
    """
    hit = [k for k in keys if k in rec]
    counts[0] += len(hit)
    if refresh:
        for k in hit:
            rec.remove(k)
            rec.append(k)
    for k in keys:
        if k in hit:
            continue
        counts[1] += 1
        if len(rec) >= cap:
            cands = [v for v in rec if v not in keys]
            if not cands:
                counts[3] += 1
                continue
            rec.remove(victim(cands))
            counts[2] += 1
        rec.append(k)
