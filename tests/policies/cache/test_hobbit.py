"""HOBBIT: each weight alone picks the victim its dimension documents; invariants on random traces."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.policies.cache.hobbit import Hobbit
from tests.policies.cache.cachetest import make_setup, run_counts, workloads


def _hobbit(setup, cap=3, **w):
    weights = {"w_recency": 0.0, "w_frequency": 0.0, "w_layer": 0.0, "w_precision": 0.0, **w}
    return Hobbit(Hobbit.Config(capacity_experts=cap, **weights), setup)


def test_each_weight_changes_the_victim_as_documented():
    # 4 layers, 2 experts each, one global pool of 3 slots; each part builds a resident set by hand
    setup = make_setup([[[0], [0], [0], [0]]], 4, 2)
    E = 2
    p = _hobbit(setup, w_recency=1.0)
    for t, (c, e) in enumerate([(0, 0), (1, 0), (2, 0), (0, 0), (0, 0)]):
        p.access(c, [e], t)
    # resident: (0,0) used 3x last at t=4, (1,0) once at t=1, (2,0) once at t=2
    assert p._victim(p.pools[0], set()) == 1 * E  # least recent: layer 1's expert
    q = _hobbit(setup, w_frequency=1.0)
    for t, (c, e) in enumerate([(1, 0), (2, 0), (0, 0), (0, 0), (2, 0)]):
        q.access(c, [e], t)
    assert q._victim(q.pools[0], set()) == 1 * E  # least used: layer 1's expert (once)
    r = _hobbit(setup, w_layer=1.0)
    for t, (c, e) in enumerate([(0, 0), (1, 0), (2, 0)]):
        r.access(c, [e], t)
    r._col = 1  # layer 1 just ran: layer 2 runs next (keep), then 0, and layer 1 last
    assert r._victim(r.pools[0], set()) == 1 * E
    r._col = 2  # layer 2 just ran: order of next runs 3, 0, 1, 2 -> layer 2's expert goes
    assert r._victim(r.pools[0], set()) == 2 * E


def test_precision_weight_alone_does_not_change_the_victim():
    steps = [[[0], [1]]] * 6
    setup = make_setup(steps, 2, 4)
    a = _hobbit(setup, cap=2, w_recency=1.0)
    b = _hobbit(setup, cap=2, w_recency=1.0, w_precision=5.0)
    seq = [(0, [0]), (1, [1]), (0, [2]), (1, [3]), (0, [0]), (1, [1])]
    ra = [a.access(c, x, t).loads for t, (c, x) in enumerate(seq)]
    rb = [b.access(c, x, t).loads for t, (c, x) in enumerate(seq)]
    assert ra == rb


@settings(max_examples=100, deadline=None)
@given(workloads(), st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=4, max_size=4))
def test_hobbit_invariants(w, ws):
    steps, C, E, cap, scope = w
    p = Hobbit(Hobbit.Config(capacity_experts=cap, scope=scope, w_recency=ws[0], w_frequency=ws[1],
                             w_layer=ws[2], w_precision=ws[3]), make_setup(steps, C, E))
    h, m, _, _ = run_counts(p, steps)
    assert h + m == sum(len(x) for step in steps for x in step)


def test_recency_only_hobbit_is_lru():
    from moesim.policies.cache.lru import Lru

    steps = [[[0, 1], [2]], [[3], [0]], [[1, 2], [1]], [[0], [3]], [[2], [2]], [[3], [1]]] * 3
    s1, s2 = make_setup(steps, 2, 4), make_setup(steps, 2, 4)
    assert run_counts(_hobbit(s1, cap=3, w_recency=1.0), steps) == run_counts(Lru(Lru.Config(capacity_experts=3), s2), steps)
