"""path_table conditioned on each token's path over several layers (EdgeMoE's preloading profile):
path counts against a brute-force count, exact prediction of a second-order routing rule that a
first-order table cannot see, and the engine's prefetches improving on such a trace."""

from __future__ import annotations

import numpy as np

from moesim.config.loader import load_scenario
from moesim.engine.plan import build_plan
from moesim.engine.run import simulate
from moesim.policies.prefetch.base import PrefetchSetup
from moesim.policies.prefetch.path_table import PathTable
from moesim.traces.format import Trace, save_trace
from tests.conftest import ROOT


def setup_for(ex, max_tokens, batch=1):
    plan = build_plan(ex, batch_size=batch, max_tokens=max_tokens, loop_trace=False)
    L = ex.shape[1]
    return PrefetchSetup(num_columns=L, num_experts=int(ex.max()) + 1, top_k=ex.shape[2], plan=plan,
                         col_src=tuple(range(L)), experts=ex, batch_size=batch, seed=0)


def second_order(T, L=6, E=8, seed=3):
    """Top-1 routing where layer l+1's expert is (expert at l-1 + expert at l) mod E: each layer
    alone says nothing about the next, two layers say everything."""
    rng = np.random.default_rng(seed)
    ex = np.zeros((T, L, 1), dtype=np.int16)
    ex[:, 0, 0] = rng.integers(0, E, T)
    ex[:, 1, 0] = rng.integers(0, E, T)
    for c in range(2, L):
        ex[:, c, 0] = (ex[:, c - 2, 0] + ex[:, c - 1, 0]) % E
    return ex


def test_path_counts_brute_force():
    rng = np.random.default_rng(7)
    T, L, E = 150, 4, 5
    ex = np.stack([rng.choice(E, size=2, replace=False) for _ in range(T * L)]).reshape(T, L, 2)
    ex[::7, 2, 1] = -1  # a dropped slot
    p = PathTable(PathTable.Config(kind="path_table", context_layers=3), setup_for(ex, 40))
    ref: dict = {}
    for row in ex[40:]:
        sets = [tuple(sorted(int(e) for e in row[c] if e >= 0)) for c in range(L)]
        for c in range(L - 1):
            for d in range(1, min(3, c + 1) + 1):
                cnt = ref.setdefault((c, d, tuple(sets[c - d + 1:c + 1])), {})
                for e in row[c + 1]:
                    if e >= 0:
                        cnt[int(e)] = cnt.get(int(e), 0) + 1
    assert p.paths == ref


def test_two_layer_paths_predict_a_second_order_rule_exactly():
    ex = second_order(2000)
    su = setup_for(ex, 200)
    one = PathTable(PathTable.Config(kind="path_table"), su)
    two = PathTable(PathTable.Config(kind="path_table", context_layers=2), su)
    right = {1: 0, 2: 0}
    n = 0
    for s in range(200):
        for c in range(1, 5):  # layers with two known layers behind the prediction
            truth = (c + 1, int(ex[s, c + 1, 0]))
            assert two.plan(s, c, [int(ex[s, c, 0])]) == [truth]
            right[1] += truth in one.plan(s, c, [int(ex[s, c, 0])])
            right[2] += 1
            n += 1
    assert right[1] / n < 0.3  # first order: about 1/8
    # first layer: only one layer is known, so both fall back to the first-order table
    assert two.plan(0, 0, [int(ex[0, 0, 0])]) == one.plan(0, 0, [int(ex[0, 0, 0])])


def test_rare_paths_back_off_to_shorter_ones():
    ex = second_order(300)
    su = setup_for(ex, 100)
    strict = PathTable(PathTable.Config(kind="path_table", context_layers=2, min_path_count=10**6), su)
    one = PathTable(PathTable.Config(kind="path_table"), su)
    for s in range(20):
        for c in range(5):
            # top-1: the per-token first-order distribution ranks like the first-order table
            assert strict.plan(s, c, [int(ex[s, c, 0])]) == one.plan(s, c, [int(ex[s, c, 0])])


def test_engine_prefetches_better_with_the_path(tmp_path):
    ex = second_order(4096)
    tr = tmp_path / "second-order.npz"
    save_trace(Trace(experts=ex, meta={"num_experts": 8, "top_k": 1, "layers": [1, 3, 5, 7, 9, 11],
                                       "source": "test: second-order synthetic routing"}), tr)
    base = ROOT / "scenarios" / "switch-base-8-rtx4090-lru-c16.yaml"
    sets = [f"trace.path={tr}", "workload.max_tokens=256", "workload.warmup_tokens=8",
            "policies.cache.capacity_experts=12", "policies.prefetch.kind=path_table"]
    one = simulate(load_scenario(base, sets)).summary
    two = simulate(load_scenario(base, [*sets, "policies.prefetch.context_layers=2"])).summary
    assert two["cache"]["prefetch_precision"] > 0.75 > one["cache"]["prefetch_precision"]
    assert two["cache"]["misses"] < one["cache"]["misses"]
    assert two["tpot_ms"]["mean"] < one["tpot_ms"]["mean"]
    again = simulate(load_scenario(base, [*sets, "policies.prefetch.context_layers=2"])).summary
    two.pop("wall_time_s"), again.pop("wall_time_s")
    assert two == again
