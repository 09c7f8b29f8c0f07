"""LRU against a brute-force reference of DESIGN 3.2's accounting, for both scopes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from moesim.errors import InputError
from moesim.policies.cache.base import CacheSetup
from moesim.policies.cache.lru import Lru
from tests.policies.cache.cachetest import workloads


def reference_lru(steps, num_columns, num_experts, capacity, scope):
    """Plain-list LRU: recency lists (least recent first), one per pool."""
    if scope == "global":
        pools = {0: []}
        pool_of = lambda c: 0  # noqa: E731
        cap = capacity
    else:
        pools = {c: [] for c in range(num_columns)}
        pool_of = lambda c: c  # noqa: E731
        cap = capacity // num_columns
    hits = misses = evictions = streamed = 0
    for step in steps:
        for c, needed in enumerate(step):
            rec = pools[pool_of(c)]
            keys = [(c, e) for e in needed]
            for k in keys:
                if k in rec:
                    hits += 1
                    rec.remove(k)
                    rec.append(k)
            for k in keys:
                if k in rec:
                    continue
                misses += 1
                if len(rec) < cap:
                    rec.append(k)
                    continue
                victim = next((v for v in rec if v not in keys), None)
                if victim is None:
                    streamed += 1
                    continue
                rec.remove(victim)
                evictions += 1
                rec.append(k)
    return hits, misses, evictions, streamed


def run_policy(steps, num_columns, num_experts, capacity, scope, top_k=1):
    setup = CacheSetup(num_columns=num_columns, num_experts=num_experts, expert_bytes=10, top_k=top_k,
                       model_layers=tuple(range(num_columns)), max_distinct_per_step=num_experts)
    lru = Lru(Lru.Config(capacity_experts=capacity, scope=scope), setup)
    hits = misses = evictions = streamed = 0
    t = 0
    for step in steps:
        for c, needed in enumerate(step):
            r = lru.access(c, needed, t)
            t += 1
            hits += len(r.hits)
            misses += len(r.loads) + len(r.streamed)
            streamed += len(r.streamed)
            evictions += sum(len(ev) for _, ev in r.loads)
            # invariant: pools never exceed capacity, and every needed expert that was a hit or a
            # load is resident now
            for p in lru.pools:
                assert p.used_bytes <= p.capacity_bytes
            for e in r.hits + [e for e, _ in r.loads]:
                assert c * num_experts + e in lru.resident
    return hits, misses, evictions, streamed


@settings(max_examples=300, deadline=None)
@given(workloads())
def test_lru_matches_reference(w):
    steps, C, E, cap, scope = w
    assert run_policy(steps, C, E, cap, scope) == reference_lru(steps, C, E, cap, scope)


@settings(max_examples=100, deadline=None)
@given(workloads())
def test_capacity_for_everything_misses_only_first_touch(w):
    steps, C, E, _, scope = w
    cap = C * E
    hits, misses, evictions, streamed = run_policy(steps, C, E, cap, scope)
    distinct = {(c, e) for step in steps for c, needed in enumerate(step) for e in needed}
    assert misses == len(distinct)
    assert evictions == 0 and streamed == 0


def test_warm_start_first_global_and_per_layer():
    setup = CacheSetup(num_columns=2, num_experts=4, expert_bytes=10, top_k=1, model_layers=(3, 5), max_distinct_per_step=4)
    g = Lru(Lru.Config(capacity_experts=5, warm_start="first"), setup)
    assert list(g.pools[0].order) == [0, 1, 2, 3, 4]  # layer-major, lowest id least recent
    p = Lru(Lru.Config(capacity_experts=4, scope="per_layer", warm_start="first"), setup)
    assert [list(pl.order) for pl in p.pools] == [[0, 1], [4, 5]]
    x = Lru(Lru.Config(capacity_experts=3, warm_start={5: [2, 1]}), setup)
    assert list(x.pools[0].order) == [6, 5]
    r = x.access(1, [3], 0)  # full? 2 of 3 used: loads without eviction
    assert r.loads == [(3, [])]
    r = x.access(1, [0], 1)  # full: evicts the least recent warm expert (2 of layer 5 = key 6)
    assert r.loads == [(0, [6])]


def test_capacity_smaller_than_top_k_is_an_input_error():
    setup = CacheSetup(num_columns=4, num_experts=8, expert_bytes=10, top_k=2, model_layers=(0, 1, 2, 3), max_distinct_per_step=2)
    with pytest.raises(InputError, match="smaller than top_k"):
        Lru(Lru.Config(capacity_experts=1), setup)
    with pytest.raises(InputError, match="per layer"):
        Lru(Lru.Config(capacity_experts=7, scope="per_layer"), setup)


def test_capacity_gib_gives_slots():
    setup = CacheSetup(num_columns=2, num_experts=8, expert_bytes=2**28, top_k=2, model_layers=(0, 1), max_distinct_per_step=2)
    lru = Lru(Lru.Config(capacity_gib=2.0, scope="per_layer"), setup)  # 8 slots, 4 per layer
    assert lru.slots_total() == 8
    assert [p.capacity_bytes for p in lru.pools] == [4 * 2**28, 4 * 2**28]
