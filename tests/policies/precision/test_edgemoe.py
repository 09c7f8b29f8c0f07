"""EdgeMoE's per-expert bitwidth: the exact solver equals a brute-force optimum, the greedy rule stays
within the budget and never gives a more important expert fewer bits, the importance profile is
the gate mass of the unreplayed rows, and every load (demand, streamed, prefetched) moves exactly
its expert's assigned format's bytes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.models.spec import BYTES_PER_PARAM
from moesim.policies.precision.edgemoe import EdgeMoe, format_errors, solve_exact, solve_greedy
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "switch-base-128-jetson-edgemoe-ssd.yaml"
SHORT = ["workload.max_tokens=160", "workload.warmup_tokens=8"]


def run(*sets, timeline=False):
    out = simulate(load_scenario(SC, [*SHORT, *sets]), record_timeline=timeline)
    return out if timeline else out.summary


def brute(imp, nb, er, budget):
    """Minimum loss over every assignment of a format to each item within ``budget`` bytes."""
    best = None
    for pick in itertools.product(range(len(nb)), repeat=len(imp)):
        if sum(nb[f] for f in pick) <= budget:
            loss = sum(i * er[f] for i, f in zip(imp, pick))
            best = loss if best is None else min(best, loss)
    return best


# formats as (bytes, error): error falls as bytes grow, as the config validator demands
formats_st = st.lists(st.integers(1, 12), min_size=1, max_size=3, unique=True).flatmap(
    lambda bs: st.lists(st.floats(0.01, 1.0), min_size=len(bs), max_size=len(bs), unique=True).map(
        lambda es: (sorted(bs), sorted(es, reverse=True))))


@settings(max_examples=60, deadline=None)
@given(imp=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, 7.0]), min_size=1, max_size=6),
       fmt=formats_st, frac=st.floats(0.0, 1.0))
def test_exact_equals_brute_force_and_greedy_keeps_its_rules(imp, fmt, frac):
    nb, er = np.array(fmt[0]), np.array(fmt[1])
    n = len(imp)
    budget = int(nb.min() * n + frac * (nb.max() - nb.min()) * n)
    ref = brute(imp, nb, er, budget)
    ex = solve_exact(imp, nb, er, budget)
    assert nb[ex].sum() <= budget
    assert float(np.dot(imp, er[ex])) == pytest.approx(ref, abs=1e-9)
    gr = solve_greedy(imp, nb, er, budget)
    assert nb[gr].sum() <= budget
    assert float(np.dot(imp, er[gr])) >= ref - 1e-9  # never better than the optimum
    for i, j in itertools.permutations(range(n), 2):
        if imp[i] > imp[j]:
            assert nb[gr[i]] >= nb[gr[j]], (i, j)  # more important: never fewer bits


@settings(max_examples=40, deadline=None)
@given(imp=st.lists(st.integers(0, 20), min_size=1, max_size=80), frac=st.floats(0.0, 1.2))
def test_greedy_budget_and_order_on_the_real_formats(imp, frac):
    fm = ["int8", "int4", "hqq2"]
    nb = np.array([round(4718592 * BYTES_PER_PARAM[f]) for f in fm])
    err = format_errors(fm)
    er = np.array([err[f] for f in fm])
    n = len(imp)
    budget = int(nb.min() * n + frac * (nb.max() - nb.min()) * n)
    gr = solve_greedy(imp, nb, er, budget)
    assert nb[gr].sum() <= budget
    bits = 8 * np.array([BYTES_PER_PARAM[f] for f in fm])[gr]
    order = np.argsort(-np.asarray(imp), kind="stable")
    assert all(bits[order[a]] >= bits[order[a + 1]] - 1e-12 for a in range(n - 1)
               if imp[order[a]] > imp[order[a + 1]])
    if frac >= 1.0:
        assert (gr == 0).all()  # room for every expert at int8
    if frac == 0.0:
        assert (gr == 2).all()  # only the smallest assignment fits


def test_greedy_spends_the_budget_along_the_hull():
    # a middle format worse per byte than jumping straight to the big one is skipped
    nb, er = np.array([1, 2, 4]), np.array([1.0, 0.9, 0.0])
    assert solve_greedy([1.0], nb, er, 4).tolist() == [2]
    assert solve_greedy([1.0], nb, er, 3).tolist() == [0]  # the hull's next step (3 bytes) does not fit
    assert solve_exact([1.0], nb, er, 3).tolist() == [1]  # ... though the exact optimum takes the middle
    with pytest.raises(ValueError, match="too large"):
        solve_exact(np.ones(3000), np.array([1, 2, 3, 4]), np.array([4.0, 3, 2, 1]), 6000)


def test_importance_is_the_unreplayed_gate_mass_and_the_budget_holds():
    out = run(timeline=True)
    p = out.summary["precision"]["assignment"]
    assert p["assigned_bytes"] <= p["budget_bytes"] and p["mean_bits"] <= 4.0 + 1e-9
    assert sum(p["experts"].values()) == 6 * 128
    assert p["profile_rows"] == 4096 - 160
    prep = out.prepared
    pol = prep.engine.precision.policy
    su = pol.setup
    ref = np.zeros((6, 128))
    for r in range(160, su.experts.shape[0]):
        for c in range(6):
            for k, e in enumerate(su.experts[r, su.col_src[c]]):
                if e >= 0:
                    ref[c, e] += float(su.weights[r, su.col_src[c], k])
    assert np.allclose(pol.importance(), ref)
    nb = prep.engine.precision.nbytes
    assert sum(nb[lv] for lv in pol.assign.reshape(-1)) == p["assigned_bytes"]
    # greedy rule on the real run: more important experts never hold fewer bits
    bits = np.array([8 * BYTES_PER_PARAM[n] for n in prep.engine.precision.names])[pol.assign].reshape(-1)
    imp = ref.reshape(-1)
    o = np.argsort(-imp, kind="stable")
    assert all(bits[o[a]] >= bits[o[a + 1]] for a in range(len(o) - 1) if imp[o[a]] > imp[o[a + 1]])


def test_every_load_moves_its_assigned_format():
    out = run(timeline=True)
    s, tl = out.summary, out.result.timeline
    pr = out.prepared.engine.precision
    assign = pr.policy.assign
    col_of = {m: c for c, m in enumerate(out.prepared.model_layers)}
    rows = [r for r in tl if r[0] == "gpu0.h2d" and r[1] in ("copy", "copy_stream", "prefetch")]
    assert any(r[1] == "prefetch" for r in rows)
    assert {r[1] for r in tl if r[0] == "gpu0.h2d"} <= {"copy", "copy_stream", "prefetch"}  # no top-ups
    for r in rows:
        assert r[7] == pr.nbytes[assign[col_of[r[5]], r[6]]], r
    m = out.prepared.engine.warmup_steps
    measured = [r for r in rows if r[4] >= m]
    t = s["transfers"]
    assert sum(r[7] for r in measured) == t["bytes_h2d_experts"] == t["bytes_ssd"]
    fmt = s["precision"]["by_format"]
    assert sum(f["bytes_h2d"] for f in fmt.values()) == t["bytes_h2d_experts"]
    assert sum(f["loads"] for f in fmt.values()) == t["copies"] == len(measured)
    assert sum(f["gate_mass_fraction"] for f in fmt.values()) == pytest.approx(1.0)
    reads = [r for r in tl if r[1] == "ssd_read"]
    assert sorted(r[7] for r in reads) == sorted(r[7] for r in rows)  # the flash reads the same formats


def test_one_format_at_the_model_dtype_equals_full_precision():
    sets = ["policies.prefetch.kind=none"]
    full = run(*sets, "policies.precision.kind=full")
    one = run(*sets, "policies.precision.formats=[int8]", "policies.precision.mean_bits=8")
    for k in ("tpot_ms", "cache", "transfers", "per_layer", "critical_path_ms"):
        assert full[k] == one[k], k
    assert one["precision"]["assignment"]["experts"] == {"int8": 768}


def test_important_experts_keep_more_bits_and_fewer_bytes_move():
    sets = ["policies.prefetch.kind=none", "policies.precision.profile=all"]
    full = run("policies.prefetch.kind=none", "policies.precision.kind=full")
    em = run(*sets)
    assert em["transfers"]["bytes_h2d_experts"] < full["transfers"]["bytes_h2d_experts"]
    assert em["cache"]["misses"] <= full["cache"]["misses"]  # smaller copies: more of them fit
    a, fmt = em["precision"]["assignment"], em["precision"]["by_format"]
    # the int8 experts are a small share of all experts but serve a much larger share of gate mass
    share_int8 = a["experts"]["int8"] / 768
    assert a["importance_share"]["int8"] > 2 * share_int8
    assert fmt["int8"]["gate_mass_fraction"] > 2 * share_int8
    # a looser budget never adds loss; the exact solver never has more than the greedy rule
    loose = run(*sets, "policies.precision.mean_bits=6")["precision"]["assignment"]
    assert loose["loss_proxy"] <= a["loss_proxy"]
    assert loose["experts"]["int8"] >= a["experts"]["int8"]
    ex = run(*sets, "policies.precision.solver=exact")["precision"]["assignment"]
    assert ex["loss_proxy"] <= a["loss_proxy"] + 1e-12 and ex["assigned_bytes"] <= ex["budget_bytes"]


def test_deterministic():
    a, b = run(), run()
    a.pop("wall_time_s"), b.pop("wall_time_s")
    assert a == b


def test_bad_input_is_one_clear_error():
    with pytest.raises(InputError, match="mean_bits.*below the smallest assignment"):
        run("policies.precision.mean_bits=1")
    with pytest.raises(InputError, match="formats.*above model.expert_dtype"):
        run("model.expert_dtype=int4")
    with pytest.raises(InputError, match="profile.*does not replay"):
        run("workload.max_tokens=4096", "workload.warmup_tokens=0", "policies.prefetch.kind=none")
    run("workload.max_tokens=4096", "workload.warmup_tokens=0", "policies.prefetch.kind=none",
        "policies.precision.profile=all")  # in sample: allowed
    for bad in ({"formats": ["int4", "int4"]}, {"formats": ["q4_k", "q4_0"]}, {"mean_bits": 4, "budget_gib": 1},
                {"formats": ["int8", "int4"], "format_error": {"int8": 0.5, "int4": 0.1}},
                {"format_error": {"fp8": 0.1}}):
        with pytest.raises(ValidationError):
            EdgeMoe.Config(kind="edgemoe", **bad)
    assert EdgeMoe.Config(kind="edgemoe", budget_gib=1.0).budget_gib == 1.0  # replaces the default mean_bits
