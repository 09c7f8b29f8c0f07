"""D²MoE nested bit-slices: never more bytes than full-precision LRU, equal to it when every
token asks for all slices, budgeted hottest-expert-bit-first against a reference re-implementation
and its invariants (budget kept, hotter experts never shallower)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.policies.precision.d2moe import D2Moe
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "mixtral-8x7b-rtx4090-d2moe-c64.yaml"
SHORT = ["workload.max_tokens=48", "workload.warmup_tokens=4"]


def run(*sets, timeline=False):
    out = simulate(load_scenario(SC, [*SHORT, *sets]), record_timeline=timeline)
    return out if timeline else out.summary


def test_all_slices_everywhere_equals_full_precision_lru():
    full = run("policies.precision.kind=full")
    d2 = run("policies.precision.thresholds=[0, 0]", "policies.precision.layer_budget_mib=null")
    for k in ("tpot_ms", "cache", "transfers", "per_layer", "critical_path_ms"):
        a, b = full[k], d2[k]
        if k == "transfers":
            a, b = dict(a), dict(b)
        assert a == b, k
    p = d2["precision"]
    assert p["low_precision_loads"] == 0 and p["topups"] == 0
    assert p["by_format"]["int8"]["loads"] == full["transfers"]["copies"]
    assert p["by_format"]["mwq2"]["loads"] == p["by_format"]["mwq4"]["loads"] == 0


@settings(max_examples=10, deadline=None)
@given(cap=st.sampled_from([16, 40, 64, 100]), t1=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
       t2=st.sampled_from([0.3, 0.6, 1.0]), budget=st.sampled_from(["null", 64, 400]),
       scope=st.sampled_from(["global", "per_layer"]), top_up=st.booleans())
def test_never_more_bytes_than_full_precision_lru(cap, t1, t2, budget, scope, top_up):
    t1 = min(t1, t2)
    if scope == "per_layer":
        cap = max(cap, 64)
    base = [f"policies.cache.capacity_experts={cap}", f"policies.cache.scope={scope}"]
    full = run(*base, "policies.precision.kind=full")
    d2 = run(*base, f"policies.precision.thresholds=[{t1}, {t2}]", f"policies.precision.layer_budget_mib={budget}",
             f"policies.precision.top_up={str(top_up).lower()}")
    assert d2["transfers"]["bytes_h2d"] <= full["transfers"]["bytes_h2d"]
    assert d2["cache"]["misses"] <= full["cache"]["misses"]  # smaller copies: at least LRU's residents stay
    fmt = d2["precision"]["by_format"]
    assert sum(f["bytes_h2d"] for f in fmt.values()) == d2["transfers"]["bytes_h2d_experts"]
    assert sum(f["gate_mass_fraction"] for f in fmt.values()) == pytest.approx(1.0)
    if not top_up:
        assert d2["precision"]["topups"] == 0


def test_bytes_per_slice_depth_and_topups_on_the_timeline():
    out = run("policies.precision.layer_budget_mib=null", timeline=True)
    s, tl = out.summary, out.result.timeline
    eb = out.prepared.scenario.model.expert_bytes
    lb = out.prepared.engine.precision.nbytes
    assert lb == [eb, eb // 2, eb // 4]  # int8 stack, top 4 bits, top 2 bits
    fmt = s["precision"]["by_format"]
    loads = {n: sum(1 for r in tl if r[1] in ("copy", "copy_stream") and r[7] == b) for n, b in zip(fmt, lb)}
    tops = [r for r in tl if r[1] == "copy_topup"]
    deltas = {lb[i] - lb[j] for i in range(3) for j in range(i + 1, 3)}  # a deeper level minus a held one
    assert len(tops) > 0 and all(r[7] in deltas for r in tops)
    m = out.prepared.engine.warmup_steps
    measured = [r for r in tops if r[4] >= m]
    assert len(measured) == s["precision"]["topups"]
    assert sum(r[7] for r in measured) == s["precision"]["bytes_topup"]
    assert sum(loads.values()) + len(tops) == sum(1 for r in tl if r[0] == "gpu0.h2d")
    assert s["precision"]["by_format"]["mwq2"]["expert_gpu_s"] < s["precision"]["by_format"]["int8"]["expert_gpu_s"]


def _reference_plan(lb, n, thresholds, budget, misses, resident):
    """Hottest-expert-bit-first written out independently: experts by decreasing gate weight
    (first appearance on ties), each taken as deep as the budget left allows, up to its ask."""
    pol = D2Moe(D2Moe.Config(slice_bits=[2, 2, 4][:n] if n == 3 else [4, 4], thresholds=thresholds))

    def want(w):
        return pol.wanted_level(w)

    order = sorted([(-w, i, e, n - 1, want(w), True) for i, (e, w) in enumerate(misses)]
                   + [(-w, len(misses) + i, e, h, want(w), False) for i, (e, w, h) in enumerate(resident) if want(w) < h])
    spent = len(misses) * lb[n - 1]
    res = {}
    for _, _, e, have, wlv, _ in order:  # greedy is the reference: one slice at a time, MSB first
        best = have
        for cand in range(have, wlv - 1, -1):
            cost = lb[cand] - lb[have]
            if budget is None or spent + cost <= budget:
                best = cand
            else:
                break
        spent += lb[best] - lb[have]
        res[e] = best
    return res


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.floats(0, 1), min_size=1, max_size=8), held=st.lists(st.integers(0, 2), min_size=8, max_size=8),
       split=st.integers(0, 8), budget=st.one_of(st.none(), st.integers(100, 2000)))
def test_hebf_plan_matches_reference(weights, held, split, budget):
    pol = D2Moe(D2Moe.Config(slice_bits=[2, 2, 4], thresholds=[0.2, 0.5]))
    lb = [800, 400, 200]
    pol.level_bytes = lb
    pol.budget = budget
    misses = [(e, w) for e, w in enumerate(weights[:split])]
    resident = [(e, w, held[e]) for e, w in enumerate(weights) if e >= split]
    miss_lv, tops = pol.plan_layer(0, misses, resident)
    ref = _reference_plan(lb, 3, [0.2, 0.5], budget, misses, resident)
    for e, _ in misses:
        assert miss_lv[e] == ref[e]
        assert miss_lv[e] >= pol.wanted_level(dict(misses)[e])
    for e, w, h in resident:
        assert tops.get(e, h) == ref.get(e, h) and tops.get(e, h) <= h
    spent = len(misses) * lb[2] + sum(lb[miss_lv[e]] - lb[2] for e, _ in misses)
    spent += sum(lb[lv] - lb[h] for (e, _, h) in resident for lv in [tops.get(e, h)])
    if budget is not None:
        assert spent <= max(budget, len(misses) * lb[2])
    # hotter never gets fewer bits than a cooler miss that asked for as many
    for (a, wa), (b, wb) in itertools.permutations(misses, 2):
        if wa > wb and pol.wanted_level(wa) <= pol.wanted_level(wb):
            assert miss_lv[a] <= miss_lv[b]


def test_bad_configs_rejected():
    with pytest.raises(InputError, match="thresholds"):
        load_scenario(SC, ["policies.precision.thresholds=[0.5, 0.1]"])
    with pytest.raises(InputError, match="thresholds"):
        load_scenario(SC, ["policies.precision.thresholds=[0.5]"])
    with pytest.raises(InputError, match="slice_bits"):
        simulate(load_scenario(SC, [*SHORT, "policies.precision.slice_bits=[2, 2, 2]", "policies.precision.thresholds=[0, 0]"]))
    with pytest.raises(InputError, match="model.expert_dtype"):
        simulate(load_scenario(SC, [*SHORT, "model.expert_dtype=bf16", "policies.cache.capacity_experts=16"]))
