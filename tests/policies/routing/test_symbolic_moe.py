"""Symbolic-MoE: whole models as experts, per-request routing to k models, batching by model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.policies.routing.symbolic_moe import SymbolicMoE, request_blocks, runs, schedules
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "symbolic-pool4-h100-symbolic-moe.yaml"
POOL = [{"name": f"m{i}", "params_b": p} for i, p in enumerate([7.2, 8.0, 8.0, 9.0])]


def pol(**kw):
    cfg = {"models": POOL, "k": 2, **kw}
    p = SymbolicMoE(SymbolicMoE.Config(**cfg))
    return p


def tiny_trace():
    # 4 requests of 3 rows, 2 MoE columns, one choice per row; votes at column 0:
    #   r0: 0,0,1 -> {0,1}   r1: 2,2,3 -> {2,3}   r2: 1,0,0 -> {0,1}   r3: 3,2,3 -> {3,2}
    col0 = [0, 0, 1, 2, 2, 3, 1, 0, 0, 3, 2, 3]
    ex = np.zeros((12, 2, 1), dtype=np.int16)
    ex[:, 0, 0] = col0
    ex[:, 1, 0] = 1
    return ex


def test_tiny_case_exact_jobs_switches_and_rows():
    ex = tiny_trace()
    arr = pol(order="arrival", rows_per_request=3).transform(ex, None, num_experts=4, seed=0, expert_params=10**9)
    grp = pol(order="grouped", rows_per_request=3).transform(ex, None, num_experts=4, seed=0, expert_params=10**9)
    # arrival: r0 (0, 1), r1 (2, 3), r2 (0, 1), r3 (3, 2): models 0 1 2 3 0 1 3 2 -> 8 runs
    assert arr.experts[::3, 0, 0].tolist() == [0, 1, 2, 3, 0, 1, 3, 2]
    # grouped, models in order of first need: 0 (r0, r2), 1 (r0, r2), 2 (r1, r3), 3 (r1, r3)
    assert grp.experts[::3, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert grp.rows.tolist() == [0, 1, 2, 6, 7, 8, 0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11, 3, 4, 5, 9, 10, 11]
    for r in (arr, grp):
        assert r.stats["model_switches_arrival"] == 8 and r.stats["model_switches_grouped"] == 4
        assert r.stats["requests"] == 4 and r.stats["jobs"] == 8
        assert np.all(r.experts[:, 1] == -1)  # only MoE layer 0 routes (to whole models)
        np.testing.assert_allclose(r.size_multipliers[0], [7.2, 8.0, 8.0, 9.0])
    assert arr.stats["model_switches"] == 8 and grp.stats["model_switches"] == 4
    # votes: r0 has 2 of 3 on model 0 and 1 on model 1 -> covered fully by its two models
    assert grp.stats["skill_vote_coverage"] == 1.0
    # with an aggregator (model 3): arrival adds it after each request, grouped at the end
    agg = pol(order="arrival", rows_per_request=3, aggregator=3).transform(ex, None, num_experts=4, seed=0,
                                                                           expert_params=10**9)
    assert agg.experts[::3, 0, 0].tolist() == [0, 1, 3, 2, 3, 3, 0, 1, 3, 3, 2, 3]
    gagg = pol(order="grouped", rows_per_request=3, aggregator=3).transform(ex, None, num_experts=4, seed=0,
                                                                            expert_params=10**9)
    assert gagg.experts[::3, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3]
    assert gagg.stats["model_switches"] == 4 and agg.stats["model_switches"] == 10


def test_requests_follow_the_trace_request_ids():
    blocks = request_blocks(6, np.array([7, 7, 3, 7, 3, 9]), None)
    assert [b.tolist() for b in blocks] == [[0, 1, 3], [2, 4], [5]]
    assert [b.tolist() for b in request_blocks(5, None, 2)] == [[0, 1], [2, 3], [4]]


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), M=st.integers(2, 6), n_req=st.integers(1, 12), agg=st.booleans())
def test_grouping_never_needs_more_switches_than_arrival_order(seed, M, n_req, agg):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, M + 1))
    chosen = [rng.permutation(M)[:k] for _ in range(n_req)]
    a = 0 if agg else None
    arrival, grouped = schedules(chosen, a)
    assert sorted(arrival) == sorted(grouped)  # the same jobs
    used = {int(m) for p in chosen for m in p}
    # grouped: one load per model used (the aggregator's block may follow the last model's)
    assert runs(m for _, m in grouped) == len(used) + (1 if agg and grouped[len(grouped) - n_req - 1][1] != 0 else 0)
    assert runs(m for _, m in grouped) <= runs(m for _, m in arrival)


@pytest.mark.parametrize("order", ["grouped", "arrival"])
def test_engine_loads_whole_models_once_per_switch(order):
    out = simulate(load_scenario(SC, [f"policies.routing.order={order}"]))
    s = out.summary
    rt = s["routing"]
    tr = out.prepared.trace
    models = np.asarray(tr.experts)[:, 0, 0]
    # the cache (18 GiB) holds one model: at batch 1 every switch is one load of the whole model
    assert s["cache"]["misses"] == rt["model_switches"] == runs(models.tolist())
    starts = [i for i in range(len(models)) if i == 0 or models[i] != models[i - 1]]
    per_model = {i: int(round(p["params_b"] * 1e9 * 2)) for i, p in enumerate(POOL)}  # bf16
    assert s["transfers"]["bytes_h2d_experts"] == sum(per_model[int(models[i])] for i in starts)
    assert s["tokens"] == len(models) == rt["jobs"] * 32


def test_grouping_requests_by_model_reduces_model_loads_and_time():
    grouped = simulate(load_scenario(SC)).summary
    arrival = simulate(load_scenario(SC, ["policies.routing.order=arrival"])).summary
    used = sum(1 for v in grouped["routing"]["rows_per_model"].values() if v)
    assert grouped["cache"]["misses"] == used < arrival["cache"]["misses"] == arrival["routing"]["model_switches_arrival"]
    assert grouped["transfers"]["bytes_h2d_experts"] < arrival["transfers"]["bytes_h2d_experts"]
    assert grouped["sim_time_s"] < arrival["sim_time_s"]
    assert grouped["tokens"] == arrival["tokens"]


def test_bad_pools_are_input_errors():
    ex = tiny_trace()
    with pytest.raises(InputError, match="num_experts=5"):
        pol(rows_per_request=3).transform(ex, None, num_experts=5, seed=0, expert_params=1)
    with pytest.raises(InputError, match="k=5"):
        pol(rows_per_request=3, k=5).transform(ex, None, num_experts=4, seed=0, expert_params=1)
    with pytest.raises(InputError, match="rows_per_request"):
        pol().transform(ex, None, num_experts=4, seed=0, expert_params=1)
    with pytest.raises(InputError, match="aggregator"):
        pol(rows_per_request=3, aggregator=4).transform(ex, None, num_experts=4, seed=0, expert_params=1)
    with pytest.raises(InputError, match="num_experts"):
        simulate(load_scenario(SC, ["model.num_experts=5"]))
