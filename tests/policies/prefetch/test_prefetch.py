"""Prefetch policies and the engine's prefetch mechanics."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml"


def run(*sets, timeline=False):
    sc = load_scenario(SC, ["workload.max_tokens=80", "workload.warmup_tokens=8", *sets])
    return simulate(sc, record_timeline=timeline)


@settings(max_examples=12, deadline=None)
@given(cap=st.sampled_from([64, 96, 160, 224]), scope=st.sampled_from(["global", "per_layer"]),
       mode=st.sampled_from(["eager", "graph"]), seed=st.integers(0, 3))
def test_oracle_prefetch_never_slower_than_none(cap, scope, mode, seed):
    sets = [f"policies.cache.capacity_experts={cap}", f"policies.cache.scope={scope}",
            f"runtime.launch_mode={mode}", f"trace.path={ROOT / 'traces' / 'mixtral-8x7b-synth.npz'}", f"seed={seed}"]
    base = run(*sets).summary
    orc = run(*sets, "policies.prefetch.kind=oracle_next_layer").summary
    assert orc["measured_time_s"] <= base["measured_time_s"] * (1 + 1e-12)
    assert orc["cache"]["prefetch_precision"] == 1.0


def test_accuracy_oracle_bounds():
    orc = run("policies.prefetch.kind=oracle_next_layer").summary
    one = run("policies.prefetch.kind=accuracy_oracle", "policies.prefetch.accuracy=1.0").summary
    for k in ("hits", "misses", "prefetch_issued", "prefetch_used", "prefetch_wasted", "evictions"):
        assert one["cache"][k] == orc["cache"][k], k
    assert one["tpot_ms"] == orc["tpot_ms"]
    zero = run("policies.prefetch.kind=accuracy_oracle", "policies.prefetch.accuracy=0.0").summary["cache"]
    assert zero["prefetch_issued"] > 0
    assert zero["prefetch_used"] == 0 and zero["prefetch_wasted"] == zero["prefetch_issued"]
    assert zero["prefetch_precision"] == 0.0


@pytest.mark.parametrize("kind", ["oracle_next_layer", "accuracy_oracle", "frequency_topk"])
def test_prefetch_accounting_and_timing(kind):
    out = run(f"policies.prefetch.kind={kind}", timeline=True)
    s, tl = out.summary, out.result.timeline
    c = s["cache"]
    # every prefetch is used or wasted by the end of the run
    assert c["prefetch_used"] + c["prefetch_wasted"] <= c["prefetch_issued"] + 8 * 64  # warm-up issues may be used later
    assert c["prefetch_issued"] > 0
    # bytes moved = copies x expert bytes, copies = demand misses + prefetches
    assert s["transfers"]["copies"] == c["misses"] + c["prefetch_issued"]
    assert s["transfers"]["bytes_h2d_experts"] == s["transfers"]["copies"] * s["transfers"]["expert_bytes"]
    # a prefetch for layer l+1 never starts before the host has read layer l's router output
    readback = {(r[4], r[5]): r[3] for r in tl if r[1] == "router_readback"}
    layers = out.prepared.model_layers
    prev_layer = {layers[i + 1]: layers[i] for i in range(len(layers) - 1)}
    pf = [r for r in tl if r[1] == "prefetch"]
    assert pf
    for r in pf:
        assert r[2] >= readback[(r[4], prev_layer[r[5]])]


def test_frequency_topk_learns_only_from_the_past():
    s = run("policies.prefetch.kind=frequency_topk").summary["cache"]
    assert 0.0 < s["prefetch_precision"] < 1.0  # a real predictor: measured, not perfect


def test_path_table_learns_out_of_sample_and_beats_chance():
    s = run("policies.prefetch.kind=path_table").summary["cache"]
    assert s["prefetch_issued"] > 0
    # top-2 of 8 experts: guessing two at random is right 25% of the time
    assert s["prefetch_precision"] > 0.25
    from moesim.errors import InputError

    with pytest.raises(InputError, match="does not replay"):
        sc = load_scenario(SC, ["workload.max_tokens=4096", "workload.warmup_tokens=0", "policies.prefetch.kind=path_table"])
        simulate(sc)


def test_path_table_transition_counts_brute_force():
    import numpy as np

    from moesim.engine.plan import build_plan
    from moesim.policies.prefetch.base import PrefetchSetup
    from moesim.policies.prefetch.path_table import PathTable

    rng = np.random.default_rng(5)
    ex = np.stack([rng.choice(4, size=2, replace=False) for _ in range(3 * 200)]).reshape(200, 3, 2)
    plan = build_plan(ex, batch_size=1, max_tokens=50, loop_trace=False)
    su = PrefetchSetup(num_columns=3, num_experts=4, top_k=2, plan=plan, col_src=(0, 1, 2), experts=ex, batch_size=1, seed=0)
    p = PathTable(PathTable.Config(kind="path_table"), su)
    ref = np.zeros((3, 4, 4), dtype=int)
    for row in ex[50:]:
        for c in range(2):
            for i in row[c]:
                for j in row[c + 1]:
                    ref[c, i, j] += 1
    assert np.array_equal(p.table, ref)


def test_readme_pregating_prefetches_the_whole_step_after_layer_zero():
    out = run("policies.prefetch.kind=readme_pregating", "policies.cache.capacity_experts=192", timeline=True)
    c = out.summary["cache"]
    assert c["prefetch_precision"] == 1.0
    pf = [r for r in out.result.timeline if r[1] == "prefetch"]
    first = out.prepared.model_layers[0]
    readback0 = {r[4]: r[3] for r in out.result.timeline if r[1] == "router_readback" and r[5] == first}
    assert all(r[2] >= readback0[r[4]] for r in pf)
    base = run("policies.cache.capacity_experts=192").summary
    assert out.summary["cache"]["misses"] < base["cache"]["misses"]


def test_sida_side_model_at_full_accuracy_equals_readme_pregating():
    sida = run("policies.prefetch.kind=accuracy_oracle", "policies.prefetch.accuracy=1.0",
               "policies.prefetch.lookahead=31", "policies.prefetch.when=first_layer",
               "policies.cache.capacity_experts=192").summary
    rme = run("policies.prefetch.kind=readme_pregating", "policies.cache.capacity_experts=192").summary
    for k in ("hits", "misses", "prefetch_issued", "prefetch_used", "prefetch_wasted", "evictions"):
        assert sida["cache"][k] == rme["cache"][k], k
    assert sida["tpot_ms"] == rme["tpot_ms"]


def test_lookahead_predicts_each_layer_once():
    out = run("policies.prefetch.kind=accuracy_oracle", "policies.prefetch.accuracy=1.0", "policies.prefetch.lookahead=3",
              timeline=True)
    c = out.summary["cache"]
    assert c["prefetch_precision"] == 1.0
    # each (step, layer) after the first is predicted exactly once: predictions == true experts
    plan, src = out.prepared.plan, out.prepared.col_src
    warm = out.result.warmup_steps
    truth = sum(len(plan.row(s, src[col])[0]) for s in range(warm, plan.steps) for col in range(1, len(src)))
    assert c["prefetch_recall"] == 1.0
    assert out.result.counters["prefetch_truth"] == truth
