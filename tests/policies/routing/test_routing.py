"""Routing variants: zero-computation experts, null experts, merging."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.policies.routing.mc_smoe_merge import McSmoeMerge
from moesim.policies.routing.moepp_zero import MoePlusPlusZero
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "mixtral-8x7b-h100-streaming.yaml"
SHORT = ["workload.max_tokens=64", "workload.warmup_tokens=0"]


def run(*sets):
    return simulate(load_scenario(SC, [*SHORT, *sets]))


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_zero_computation_experts_cut_traffic_by_exactly_their_share(share):
    base = run().summary
    out = run("policies.routing.kind=moepp_zero", f"policies.routing.zero_share={share}")
    s = out.summary
    ex = np.asarray(out.prepared.trace.experts)[:64]  # the replayed rows, after the transform
    kept = int((ex >= 0).sum())
    routed = 64 * 32 * 2
    # streaming at batch 1: every routed choice is one copy; zero-computation ones cost nothing
    assert base["transfers"]["copies"] == routed
    assert s["transfers"]["copies"] == kept
    assert s["transfers"]["bytes_h2d_experts"] == base["transfers"]["bytes_h2d_experts"] * kept // routed
    assert 0 < s["routing"]["dropped_share"] < 1
    assert "moepp_zero" in s["routing_note"]


@settings(max_examples=100, deadline=None)
@given(share=st.floats(0, 1), seed=st.integers(0, 50), allow_empty=st.booleans())
def test_moepp_keeps_a_real_expert_per_token_unless_allowed(share, seed, allow_empty):
    rng = np.random.default_rng(seed)
    ex = np.stack([rng.choice(8, 2, replace=False) for _ in range(40 * 3)]).reshape(40, 3, 2)
    pol = MoePlusPlusZero(MoePlusPlusZero.Config(zero_share=share, allow_empty=allow_empty))
    out = pol.transform(ex, None, num_experts=8, seed=seed).experts
    assert np.all((out == ex) | (out == -1))
    if not allow_empty:
        assert np.all((out >= 0).sum(axis=2) >= 1)
    if share == 0:
        assert np.array_equal(out, ex)


def test_adamoe_null_drops_only_low_weight_choices_never_the_top_one():
    out = run("policies.routing.kind=adamoe_null", "policies.routing.threshold=0.4")
    tr = out.prepared.trace
    orig = load_scenario(SC, SHORT)
    from moesim.traces import load_trace

    raw = load_trace(orig.trace.path)
    w = np.asarray(raw.weights, dtype=np.float64)
    expect = np.where((w < 0.4) & (np.arange(2)[None, None, :] > 0), -1, raw.experts)
    assert np.array_equal(np.asarray(tr.experts), expect)
    assert out.summary["transfers"]["copies"] == int((expect[:64] >= 0).sum())
    with pytest.raises(InputError, match="gate weights"):
        simulate(load_scenario(ROOT / "scenarios" / "switch-base-8-rtx4090-lru-c16.yaml", ["policies.routing.kind=adamoe_null"]))


def test_merging_leaves_at_most_groups_experts_per_layer():
    out = run("policies.routing.kind=mc_smoe_merge", "policies.routing.groups=3")
    ex = np.asarray(out.prepared.trace.experts)
    for l in range(ex.shape[1]):
        assert len(np.unique(ex[:, l][ex[:, l] >= 0])) <= 3
        for row in ex[:, l]:
            real = row[row >= 0]
            assert len(real) == len(set(real.tolist())) >= 1  # no duplicate within a token
    base = run().summary
    assert out.summary["transfers"]["copies"] <= base["transfers"]["copies"]
    merged_lru = simulate(load_scenario(ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml", [*SHORT, "policies.routing.kind=mc_smoe_merge", "policies.routing.groups=3"])).summary
    plain_lru = simulate(load_scenario(ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml", SHORT)).summary
    assert merged_lru["cache"]["hit_rate"] > plain_lru["cache"]["hit_rate"]  # 96 slots hold all 96 merged experts


def test_merge_map_brute_force():
    from moesim.policies.routing.mc_smoe_merge import merge_map

    col = np.array([[0, 1], [0, 2], [3, 1], [0, 1], [2, 3]])
    mp = merge_map(col, 4, 2)
    # counts: 0:3, 1:3, 2:2, 3:2 -> dominant 0 and 1; 2 co-occurs with 0 once, with 3 once -> 0;
    # 3 co-occurs with 1 once, with 2 once -> 1
    assert mp.tolist() == [0, 1, 0, 1]
    pol = McSmoeMerge(McSmoeMerge.Config(groups=2))
    out = pol.transform(col[:, None, :], None, num_experts=4, seed=0).experts[:, 0, :]
    assert out.tolist() == [[0, 1], [0, -1], [1, -1], [0, 1], [0, 1]]
