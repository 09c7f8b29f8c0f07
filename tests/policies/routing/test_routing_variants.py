"""Routing variants: dynamic top-p, PreMoe task subsets, HMoE heterogeneous sizes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.policies.routing.hmoe import HMoE
from moesim.policies.routing.none import NoRouting
from moesim.policies.routing.premoe import PreMoe
from moesim.policies.routing.top_p import TopP, router_distribution
from moesim.traces import Trace, load_trace
from tests.conftest import ROOT

STREAM = ROOT / "scenarios" / "mixtral-8x7b-h100-streaming.yaml"
LRU = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml"
SWITCH = ROOT / "scenarios" / "switch-base-8-rtx4090-lru-c16.yaml"
SHORT = ["workload.max_tokens=64", "workload.warmup_tokens=0"]


def topp(p, max_k=None, tail_ratio=None):
    return TopP(TopP.Config(p=p, max_k=max_k, tail_ratio=tail_ratio))


def random_routing(seed, T, L, E, K, with_probs):
    """Experts/weights consistent with a random router distribution (its top-K, renormalised)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(T, L, E)) * rng.uniform(0.2, 3.0)
    probs = np.exp(logits - logits.max(axis=2, keepdims=True))
    probs /= probs.sum(axis=2, keepdims=True)
    ex = np.argsort(-probs, axis=2, kind="stable")[:, :, :K]
    w = np.take_along_axis(probs, ex, axis=2)
    w /= w.sum(axis=2, keepdims=True)
    return ex.astype(np.int16), w.astype(np.float16), (probs.astype(np.float16) if with_probs else None)


# ----------------------------------------------------------------------------------------------
# top-p


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000), E=st.integers(2, 12), K=st.integers(1, 3), max_k=st.integers(1, 6),
    ps=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=4), with_probs=st.booleans(),
)
def test_top_p_selects_at_least_one_expert_per_token_and_never_fewer_as_p_grows(seed, E, K, max_k, ps, with_probs):
    K = min(K, E)
    ex, w, probs = random_routing(seed, 12, 3, E, K, with_probs)
    if K >= 2:  # some tokens use fewer experts (AdaMoE-style -1 slots): a fitted row takes its layer's median decay
        rng = np.random.default_rng(seed)
        ex[2:][rng.random((10, 3)) < 0.3, K - 1] = -1
    ex[1, 0] = -1  # a token with no expert at one layer keeps none
    tail = 0.5 if K == 1 else None  # one choice per token: the fitted tail needs a decay
    prev = None
    for p in sorted(ps):
        out = topp(p, max_k, tail).transform(ex, w, num_experts=E, seed=seed, probs=probs).experts
        n = (out >= 0).sum(axis=2)
        assert np.all(n[(ex >= 0).any(axis=2)] >= 1) and np.all(out[1, 0] == -1)
        assert np.all(n <= min(max_k, E))
        for row in out.reshape(-1, out.shape[2]):  # distinct experts, -1 only as trailing padding
            real = row[row >= 0]
            assert len(set(real.tolist())) == len(real) and np.all(row[len(real):] == -1)
        if prev is not None:
            n0 = (prev >= 0).sum(axis=2)
            assert np.all(n >= n0)
            # nested: the smaller p's selection is a prefix of the larger p's
            ranks = np.arange(out.shape[2])[None, None, :] < n0[..., None]
            assert np.array_equal(np.where(ranks, out, -1), prev)
        prev = out


def test_top_p_exact_selection_on_hand_made_probs():
    probs = np.array(
        [
            [[0.50, 0.30, 0.15, 0.05]],  # p=0.6: 0 then 1 (0.8)
            [[0.10, 0.20, 0.65, 0.05]],  # 2 alone (0.65)
            [[0.25, 0.25, 0.25, 0.25]],  # ties to the lower id: 0, 1, 2 (0.75); max_k 3
            [[0.05, 0.05, 0.05, 0.85]],  # 3 alone
            [[0.30, 0.30, 0.20, 0.20]],  # exactly 0.6 with 0, 1
        ],
        dtype=np.float16,
    )
    ex = np.argsort(-probs.astype(np.float64), axis=2, kind="stable")[:, :, :2]
    w = np.take_along_axis(probs, ex, axis=2)
    res = topp(0.6, max_k=3).transform(ex, w, num_experts=4, seed=0, probs=probs)
    assert res.experts[:, 0].tolist() == [[0, 1, -1], [2, -1, -1], [0, 1, 2], [3, -1, -1], [0, 1, -1]]
    np.testing.assert_allclose(res.weights[0, 0].astype(float), [0.625, 0.375, 0], atol=1e-3)
    st_ = res.stats
    assert st_["probs_source"] == "trace" and st_["max_k"] == 3
    assert st_["mean_experts_per_token"] == pytest.approx(9 / 5)
    assert st_["experts_per_token_share"] == pytest.approx([0, 2 / 5, 2 / 5, 1 / 5])
    # the trace's top-2: rows 0,1 (2nd choice dropped in row 1), 2, 3 (2nd dropped), 4
    tm = [0.8, 0.85, 0.5, 0.9, 0.6]
    kept = [0.8, 0.65, 0.5, 0.85, 0.6]
    assert st_["gate_mass_kept_share"] == pytest.approx(sum(kept) / sum(tm), rel=1e-3)
    assert st_["capped_share"] == 0.0
    # p = 1 with max_k 2 caps every row whose top two hold less than everything
    capped = topp(1.0, max_k=2).transform(ex, w, num_experts=4, seed=0, probs=probs)
    assert np.all((capped.experts >= 0).sum(axis=2) == 2) and capped.stats["capped_share"] == 1.0


def test_top_p_fitted_model_brute_force():
    # two choices with weights 0.6 / 0.4 of 5 experts: r = 0.4 / 0.6; tail 0.4 r, 0.4 r^2, 0.4 r^3
    ex = np.array([[[3, 1]]], dtype=np.int16)
    w = np.array([[[0.6, 0.4]]])
    r = 0.4 / 0.6
    q = np.array([0.6, 0.4, 0.4 * r, 0.4 * r**2, 0.4 * r**3])
    q /= q.sum()
    ids, mass, info = router_distribution(ex, w, None, num_experts=5, depth=5, seed=1)
    np.testing.assert_allclose(mass[0, 0], q)
    assert ids[0, 0, :2].tolist() == [3, 1] and sorted(ids[0, 0].tolist()) == [0, 1, 2, 3, 4]
    assert info["r"][0, 0] == pytest.approx(r)
    # weights listed out of rank order are sorted first
    ids2, mass2, _ = router_distribution(ex[:, :, ::-1], w[:, :, ::-1], None, num_experts=5, depth=5, seed=1)
    np.testing.assert_allclose(mass2, mass)
    assert ids2[0, 0, :2].tolist() == [3, 1]
    # top-p on it: cumulative q = 0.39, 0.65, 0.83, 0.94, 1
    for p, n in [(0.3, 1), (0.5, 2), (0.8, 3), (0.9, 4), (0.99, 5)]:
        out = topp(p, max_k=5).transform(ex, w, num_experts=5, seed=1).experts
        assert int((out >= 0).sum()) == n, p
    # a set tail_ratio replaces the fitted decay
    _, m3, _ = router_distribution(ex, w, None, num_experts=5, depth=5, seed=1, tail_ratio=0.5)
    q3 = np.array([0.6, 0.4, 0.2, 0.1, 0.05])
    np.testing.assert_allclose(m3[0, 0], q3 / q3.sum())


def test_top_p_tail_experts_follow_the_layers_routing_frequency():
    # expert 5 is the most routed at the layer (about 200 of 800 choices, 0-4 about 120 each, 6
    # and 7 never): in rows that do not choose it, it takes the first tail rank in proportion,
    # about 200 / (200 + 3 * 120) of the time; never-routed experts almost never
    rng = np.random.default_rng(0)
    T = 400
    first = rng.integers(0, 5, T)
    ex = np.stack([first, np.full(T, 5)], axis=1)[:, None, :]
    ex[: T // 2, 0, 1] = (first[: T // 2] + 1) % 5  # half the rows do not use 5
    w = np.tile([0.55, 0.45], (T, 1))[:, None, :]
    ids, _, _ = router_distribution(ex, w, None, num_experts=8, depth=3, seed=3)
    third = ids[: T // 2, 0, 2]
    assert 0.25 < np.mean(third == 5) < 0.5
    assert np.mean(np.isin(third, [6, 7])) < 0.03
    assert not np.any(third == ex[: T // 2, 0, 0]) and not np.any(third == ex[: T // 2, 0, 1])


def test_top_p_run_replays_the_selection():
    out = simulate(load_scenario(STREAM, [*SHORT, "policies.routing.kind=top_p", "policies.routing.p=0.6",
                                          "policies.routing.max_k=4"]))
    ex = np.asarray(out.prepared.trace.experts)
    assert ex.shape[2] == 4
    s = out.summary
    # streaming at batch 1: every selected expert is one copy
    assert s["transfers"]["copies"] == int((ex[:64] >= 0).sum())
    r = s["routing"]
    assert r["policy"] == "top_p" and r["probs_source"] == "fitted"
    assert 1 <= r["mean_experts_per_token"] <= 4 and 0 < r["gate_mass_kept_share"] <= 1
    assert "fitted from the gate weights" in s["routing_note"]
    # the bundled scenario runs too
    sc = simulate(load_scenario(ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96-topp50.yaml", SHORT)).summary
    assert sc["routing"]["p"] == 0.5


def test_top_p_without_weights_or_probs_needs_a_tail_ratio():
    with pytest.raises(InputError, match="probs"):
        simulate(load_scenario(SWITCH, ["policies.routing.kind=top_p"]))
    out = simulate(load_scenario(SWITCH, ["policies.routing.kind=top_p", "policies.routing.tail_ratio=0.5",
                                          "policies.routing.p=0.3"]))
    assert out.summary["routing"]["mean_experts_per_token"] >= 1


def test_transform_trace_passes_probs_to_the_policies_that_use_them():
    ex, w, probs = random_routing(5, 20, 2, 6, 2, True)
    tr = Trace(experts=ex, weights=w, probs=probs)
    res = topp(0.7).transform_trace(tr, num_experts=6, seed=0)
    assert res.stats["probs_source"] == "trace"
    direct = topp(0.7).transform(ex, w, num_experts=6, seed=0, probs=probs)
    assert np.array_equal(res.experts, direct.experts)
    # a policy that takes no probs is called as before
    assert NoRouting(NoRouting.Config()).transform_trace(tr, num_experts=6, seed=0).experts is not None


# ----------------------------------------------------------------------------------------------
# PreMoe


def premoe(**kw):
    return PreMoe(PreMoe.Config(**kw))


def test_premoe_keeps_the_task_experts_and_remaps_by_probs():
    # one layer, 5 experts; task mass (probs summed): e0 1.17, e1 1.2, e2 0.5, e3 0.2, e4 0.93
    probs = np.array(
        [
            [[0.6, 0.3, 0.05, 0.05, 0.0]],
            [[0.02, 0.5, 0.3, 0.1, 0.08]],
            [[0.5, 0.1, 0.1, 0.05, 0.25]],
            [[0.05, 0.3, 0.05, 0.0, 0.6]],
        ]
    )
    ex = np.array([[[0, 1]], [[1, 2]], [[0, 4]], [[4, 1]]], dtype=np.int16)
    w = np.array([[[0.7, 0.3]], [[0.6, 0.4]], [[0.7, 0.3]], [[0.9, 0.1]]], dtype=np.float16)
    res = premoe(keep_experts=2).transform(ex, w, num_experts=5, seed=0, probs=probs, expert_bytes=1000)
    assert res.stats["kept_experts_per_layer"] == [[0, 1]]
    # row 1: 2 pruned -> the kept expert not used yet, 0; row 2: 4 -> 1; row 3: 4 -> 0 (1 is used)
    assert res.experts[:, 0].tolist() == [[0, 1], [1, 0], [0, 1], [0, 1]]
    s = res.stats
    assert s["pruned_experts"] == 3 and s["memory_saved_bytes"] == 3000 and s["experts_never_needed"] == 3
    assert s["pruned_choice_share"] == pytest.approx(3 / 8) and s["remapped_choices"] == 3
    assert s["dropped_choices"] == 0
    pm = (0.4 + 0.3 + 0.9) / 4  # gate mass of the pruned choices over all (4 rows, weights sum 1)
    assert s["pruned_gate_mass_share"] == pytest.approx(pm, rel=1e-3)
    assert s["gate_mass_kept_share"] == pytest.approx(1 - pm, rel=1e-3)
    assert s["task_mass_kept_share"] == pytest.approx(2.37 / 4.0)
    # keeping 0, 1, 4: row 1's pruned 2 goes to the kept expert its router prefers (4: 0.08 > 0.02),
    # not to the task's top expert 0
    k3 = premoe(keep_experts=3).transform(ex, w, num_experts=5, seed=0, probs=probs)
    assert k3.stats["kept_experts_per_layer"] == [[0, 1, 4]]
    assert k3.experts[:, 0].tolist() == [[0, 1], [1, 4], [0, 4], [4, 1]]
    drop = premoe(keep_experts=2, remap="drop").transform(ex, w, num_experts=5, seed=0, probs=probs)
    assert drop.experts[:, 0].tolist() == [[0, 1], [1, -1], [0, -1], [-1, 1]]
    assert drop.stats["dropped_gate_mass_share"] == pytest.approx(pm, rel=1e-3)


def test_premoe_without_probs_scores_by_gate_mass_and_remaps_to_the_top_kept():
    ex = np.array([[[0, 1]], [[0, 2]], [[1, 3]], [[3, 2]]], dtype=np.int16)
    w = np.array([[[0.5, 0.5]], [[0.9, 0.1]], [[0.8, 0.2]], [[0.6, 0.4]]])
    # task mass: e0 1.4, e1 1.3, e2 0.5, e3 0.8 -> keep 0, 1
    res = premoe(keep_experts=2).transform(ex, w, num_experts=4, seed=0)
    assert res.stats["kept_experts_per_layer"] == [[0, 1]]
    assert res.experts[:, 0].tolist() == [[0, 1], [0, 1], [1, 0], [0, 1]]
    assert res.stats["memory_saved_bytes"] is None
    # a profile window: rows 2-3 only -> e3 1.4, e1 0.8, e2 0.4 -> keep 3, 1
    win = premoe(keep_experts=2, profile_start=2, profile_rows=2).transform(ex, w, num_experts=4, seed=0)
    assert win.stats["kept_experts_per_layer"] == [[1, 3]] and win.stats["profile_rows"] == [2, 4]
    assert "outside_profile_gate_mass_kept_share" in win.stats
    with pytest.raises(InputError, match="profile_start"):
        premoe(profile_start=10).transform(ex, w, num_experts=4, seed=0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 1000), N=st.integers(1, 8), remap=st.sampled_from(["best_kept", "drop"]),
       with_probs=st.booleans())
def test_premoe_output_uses_only_kept_experts(seed, N, remap, with_probs):
    ex, w, probs = random_routing(seed, 30, 3, 8, 2, with_probs)
    res = premoe(keep_experts=N, remap=remap).transform(ex, w, num_experts=8, seed=0, probs=probs)
    out = res.experts
    for l, kept in enumerate(res.stats["kept_experts_per_layer"]):
        assert len(kept) == N
        used = set(out[:, l][out[:, l] >= 0].tolist())
        assert used <= set(kept)
    for row in out.reshape(-1, 2):
        real = row[row >= 0]
        assert len(real) == len(set(real.tolist()))
    if remap == "best_kept" and N >= 2:  # room for both choices: nobody loses an expert
        assert np.array_equal((out >= 0).sum(axis=2), (ex >= 0).sum(axis=2))
    if N == 8:
        assert np.array_equal(out, ex)


def test_premoe_subset_fits_the_cache():
    # 3 experts x 32 layers = 96 = the cache: after the first loads every access hits
    out = simulate(load_scenario(LRU, ["workload.max_tokens=128", "workload.warmup_tokens=0",
                                       "policies.routing.kind=premoe", "policies.routing.keep_experts=3"]))
    s = out.summary
    assert s["transfers"]["copies"] <= 96
    assert s["routing"]["pruned_experts"] == 32 * 5
    sc = simulate(load_scenario(ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96-premoe-keep4.yaml", SHORT)).summary
    assert sc["routing"]["profile_rows"] == [2048, 4096]


# ----------------------------------------------------------------------------------------------
# HMoE


MULT = [0.25, 0.5, 0.75, 1.0, 1.0, 1.25, 1.5, 1.75]


def test_hmoe_reports_per_size_class_and_leaves_routing_unchanged():
    tr = load_trace(ROOT / "traces" / "mixtral-8x7b-synth.npz")
    ex, w = np.asarray(tr.experts)[:500], np.asarray(tr.weights)[:500]
    pol = HMoE(HMoE.Config(expert_size_multipliers=MULT, assign="listed"))
    res = pol.transform(ex, w, num_experts=8, seed=0, expert_bytes=1 << 20)
    assert res.experts is ex
    s = res.stats
    assert s["simulated"] is True and s["expert_memory_ratio"] == pytest.approx(1.0)
    assert np.array_equal(res.size_multipliers, np.broadcast_to(MULT, (ex.shape[1], 8)))
    m = np.asarray(MULT)[ex.astype(int)]
    assert s["expert_compute_ratio_per_choice"] == pytest.approx(m.mean())
    for key in ("memory_share", "routed_share", "gate_mass_share", "compute_share"):
        assert sum(c[key] for c in s["size_classes"]) == pytest.approx(1.0)
    one = next(c for c in s["size_classes"] if c["multiplier"] == 1.0)
    assert one["experts_per_layer"] == 2 and one["expert_bytes"] == 1 << 20
    assert one["routed_share"] == pytest.approx(np.isin(ex, [3, 4]).mean())
    # popular_small: each layer's most routed expert is the smallest
    small = HMoE(HMoE.Config(expert_size_multipliers=MULT, assign="popular_small")).transform(
        ex, w, num_experts=8, seed=0).stats
    large = HMoE(HMoE.Config(expert_size_multipliers=MULT, assign="popular_large")).transform(
        ex, w, num_experts=8, seed=0).stats
    assert small["expert_compute_ratio_per_choice"] < 1.0 < large["expert_compute_ratio_per_choice"]
    with pytest.raises(InputError, match="8 experts"):
        HMoE(HMoE.Config(expert_size_multipliers=[1.0, 2.0])).transform(ex, w, num_experts=8, seed=0)


def test_hmoe_report_only_run_is_the_plain_run_plus_a_report():
    plain = simulate(load_scenario(LRU, SHORT)).summary
    het = simulate(load_scenario(ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96-hmoe.yaml",
                                 [*SHORT, "policies.routing.report_only=true"])).summary
    assert het["transfers"] == plain["transfers"] and het["tpot_ms"] == plain["tpot_ms"]
    assert het["routing"]["policy"] == "hmoe" and "REPORT ONLY" in het["routing_note"]
