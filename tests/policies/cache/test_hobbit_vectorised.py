"""HOBBIT's vectorised victim choice makes exactly the decisions of the original scan of the pool
(kept here as the reference), on random traces with prefetches, warm starts and both scopes, and at
a large capacity. How much faster it is is measured in ``benchmarks/test_hobbit_speed.py`` (no
timed assertion here)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.policies.cache.base import CachePolicy, Pool
from moesim.policies.cache.hobbit import Hobbit
from moesim.policies.cache.moe_infinity import layer_proximity
from tests.policies.cache.cachetest import make_setup, workloads


class HobbitScan(CachePolicy):
    """The pre-vectorisation HOBBIT: per-key dicts and a Python scan of the pool in recency order,
    the lowest score winning with strict ``<`` (the least recent on ties)."""

    Config = None  # not registered

    def __init__(self, config, setup):
        self.last, self.uses, self.precision = {}, {}, {}
        self._now = self._col = 0
        super().__init__(config, setup)

    def access(self, column, experts, t, sizes=None):
        self._now, self._col = t, column
        for e in experts:
            k = column * self.E + e
            self.uses[k] = self.uses.get(k, 0) + 1
        return super().access(column, experts, t, sizes)

    def scores(self, pool, protect):
        c = self.config
        cands = [k for k in pool.order if k not in protect]
        if not cands:
            return {}
        maxu = max(self.uses.get(k, 0) for k in cands) or 1
        now1, L = self._now + 1, self.setup.num_columns
        return {k: (c.w_recency * (self.last.get(k, -1) + 1) / now1
                    + c.w_frequency * self.uses.get(k, 0) / maxu
                    + c.w_layer * layer_proximity(k // self.E, self._col, L)
                    + c.w_precision * self.precision.get(k, 1.0)) for k in cands}

    def _on_hit(self, pool: Pool, key, t):
        self.last[key] = t
        del pool.order[key]
        pool.order[key] = None

    def _on_insert(self, pool, key, t):
        self.last[key] = t
        self.precision[key] = 1.0

    def _victim(self, pool, protect):
        best = best_s = None
        for k, s in self.scores(pool, protect).items():
            if best_s is None or s < best_s:
                best, best_s = k, s
        return best


def _pair(setup_args, cap, scope, ws, warm):
    cfg = Hobbit.Config(capacity_experts=cap, scope=scope, w_recency=ws[0], w_frequency=ws[1],
                        w_layer=ws[2], w_precision=ws[3], warm_start=warm)
    return Hobbit(cfg, make_setup(*setup_args)), HobbitScan(cfg, make_setup(*setup_args))


WEIGHTS = st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0, 3.0]), min_size=4, max_size=4)


@settings(max_examples=150, deadline=None)
@given(workloads(), WEIGHTS, st.sampled_from(["none", "first", "popular"]), st.data())
def test_same_decisions_as_the_scan(w, ws, warm, data):
    steps, C, E, cap, scope = w
    fast, ref = _pair((steps, C, E), cap, scope, ws, warm)
    assert list(fast.resident) == list(ref.resident)
    t = 0
    for step in steps:
        for c, needed in enumerate(step):
            a, b = fast.access(c, needed, t), ref.access(c, needed, t)
            assert (a.hits, a.loads, a.streamed) == (b.hits, b.loads, b.streamed)
            if c + 1 < C and data.draw(st.booleans()):  # a prefetch of the next layer
                e = data.draw(st.integers(0, E - 1))
                protect = {c * E + x for x in needed} | {(c + 1) * E + e}
                assert fast.prefetch(c + 1, e, t, protect) == ref.prefetch(c + 1, e, t, protect)
            for p_f, p_r in zip(fast.pools, ref.pools):
                assert list(p_f.order) == list(p_r.order)  # same residents in the same recency order
                assert fast.scores(p_f, set()) == ref.scores(p_r, set())
            t += 1


def test_same_decisions_as_the_scan_at_a_large_capacity():
    rng = np.random.default_rng(0)
    C, E, S = 48, 128, 3
    steps = [[list(rng.choice(E, size=8, replace=False)) for _ in range(C)] for _ in range(S)]
    out = {}
    for name, cls in (("fast", Hobbit), ("scan", HobbitScan)):
        p = cls(Hobbit.Config(capacity_experts=2000, warm_start="first"), make_setup(steps, C, E))
        t = 0
        res = []
        for step in steps:
            for c, needed in enumerate(step):
                res.append(p.access(c, needed, t).loads)
                t += 1
        out[name] = res
    assert out["fast"] == out["scan"]
    assert sum(len(x) for x in out["fast"]) > 0  # the pool was full: victims were chosen


def test_victim_is_none_when_everything_is_protected():
    setup = make_setup([[[0, 1]]], 1, 2)
    p = Hobbit(Hobbit.Config(capacity_experts=2, warm_start="first"), setup)
    assert p._victim(p.pools[0], {0, 1}) is None
    assert p.scores(p.pools[0], {0, 1}) == {}

