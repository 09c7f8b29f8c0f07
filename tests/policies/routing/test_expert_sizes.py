"""Heterogeneous expert sizes (HMoE) in the engines: bytes, byte-sized cache pools, kernel time, memory."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.models.expert_sizes import ExpertSizes
from moesim.perf.predictor import Predictor
from moesim.policies.cache.base import CacheSetup
from moesim.policies.cache.lru import Lru
from tests.conftest import ROOT

LRU = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml"
STREAM = ROOT / "scenarios" / "mixtral-8x7b-h100-streaming.yaml"
ORACLE = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96-prefetch-oracle.yaml"
HMOE = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96-hmoe.yaml"
EP = ROOT / "scenarios" / "mixtral-8x22b-ep8-direct.yaml"
SHORT = ["workload.max_tokens=48", "workload.warmup_tokens=0"]
MULT = [0.25, 0.5, 0.75, 1.0, 1.0, 1.25, 1.5, 1.75]
ONES = "model.expert_size_multipliers=[1,1,1,1,1,1,1,1]"


def sets(mult):
    return f"model.expert_size_multipliers=[{','.join(str(x) for x in mult)}]"


def strip(summary):
    s = {k: v for k, v in summary.items() if k not in ("wall_time_s", "scenario_hash")}
    s["memory"] = {k: v for k, v in s["memory"].items() if k != "expert_sizes"}
    return s


@pytest.mark.parametrize("path", [LRU, STREAM, ORACLE])
def test_all_multipliers_one_reproduce_the_plain_run_exactly(path):
    plain = simulate(load_scenario(path, SHORT)).summary
    ones = simulate(load_scenario(path, [*SHORT, ONES]))
    assert ones.prepared.engine.sizes is not None  # the sized code path ran
    assert strip(ones.summary) == strip(plain)
    assert ones.summary["memory"]["expert_sizes"]["mean_multiplier"] == 1.0


def test_all_multipliers_one_reproduce_the_plain_expert_parallel_run():
    plain = simulate(load_scenario(EP, ["workload.max_tokens=4096"])).summary
    ones = simulate(load_scenario(EP, ["workload.max_tokens=4096", ONES]))
    assert ones.prepared.engine.size_tables is not None
    assert strip(ones.summary) == strip(plain)


def test_equal_sizes_leave_old_scenario_hashes_unchanged():
    sc = load_scenario(LRU, SHORT)
    assert "expert_size_multipliers" not in simulate(sc).prepared.scenario.model.model_dump(exclude_none=True)
    from moesim.config.loader import resolved_dict

    assert "expert_size_multipliers" not in resolved_dict(sc)["model"]


def brute_force_lru(rows, cap_bytes, size_of, E):
    """Byte-sized global LRU at batch 1 (DESIGN 3.2 accounting): (loads+streams, bytes moved)."""
    lru: OrderedDict = OrderedDict()
    used = 0
    misses = moved = 0
    for row in rows:  # row: [L, K] experts of one token
        for c, choice in enumerate(row):
            need = list(dict.fromkeys(int(e) for e in choice if e >= 0))
            keys = [c * E + e for e in need]
            for k in keys:
                if k in lru:
                    lru.move_to_end(k)
            for k in keys:
                if k in lru:
                    continue
                misses += 1
                moved += size_of(k)
                while used + size_of(k) > cap_bytes:
                    victim = next((v for v in lru if v not in keys), None)
                    if victim is None:
                        break
                    used -= size_of(victim)
                    del lru[victim]
                if used + size_of(k) <= cap_bytes:
                    lru[k] = None
                    used += size_of(k)
    return misses, moved


@pytest.mark.parametrize("assign", ["listed", "popular_small", "popular_large"])
def test_bytes_moved_are_the_sum_of_each_loaded_experts_own_bytes(assign):
    out = simulate(load_scenario(HMOE, [*SHORT, f"policies.routing.assign={assign}"]), record_timeline=True)
    s = out.summary
    eng = out.prepared.engine
    kb = eng.sizes[0]
    E = 8
    # every copy on the timeline moved its own expert's bytes
    copies = [r for r in out.result.timeline if r[1] in ("copy", "copy_stream", "prefetch")]
    col = {layer: c for c, layer in enumerate(out.prepared.model_layers)}
    assert copies and all(r[7] == kb[col[r[5]] * E + r[6]] for r in copies)
    assert sum(r[7] for r in copies) == s["transfers"]["bytes_h2d_experts"]
    # and the loads are a byte-sized LRU's: brute force on the replayed routing
    rows = np.asarray(out.prepared.trace.experts)[:48]
    misses, moved = brute_force_lru(rows, 96 * eng.expert_bytes, lambda k: kb[k], E)
    assert s["cache"]["misses"] == misses and s["transfers"]["bytes_h2d_experts"] == moved
    assert s["cache"]["misses"] != simulate(load_scenario(LRU, SHORT)).summary["cache"]["misses"] or assign == "listed"


def test_small_popular_experts_move_fewer_bytes_than_equal_sizes_with_the_same_parameters():
    plain = simulate(load_scenario(STREAM, SHORT)).summary
    runs, outs = {}, {}
    for assign in ("popular_small", "popular_large"):
        outs[assign] = simulate(load_scenario(STREAM, [*SHORT, "policies.routing.kind=hmoe", f"policies.routing.assign={assign}",
                                                       f"policies.routing.expert_size_multipliers={MULT}"]))
        runs[assign] = outs[assign].summary
    # the same total expert parameters (mean multiplier 1) ...
    for r in runs.values():
        assert r["memory"]["host_expert_bytes"] == plain["memory"]["host_expert_bytes"]
    # ... but routing more tokens to the small experts loads fewer bytes (and the large ones more)
    small, large = runs["popular_small"]["transfers"], runs["popular_large"]["transfers"]
    assert small["copies"] == plain["transfers"]["copies"] == large["copies"]
    assert small["bytes_h2d_experts"] < plain["transfers"]["bytes_h2d_experts"] < large["bytes_h2d_experts"]
    assert runs["popular_small"]["tpot_ms"]["mean"] < plain["tpot_ms"]["mean"] < runs["popular_large"]["tpot_ms"]["mean"]
    # streaming at batch 1: every routed choice is one load of that expert's own bytes
    for assign, out in outs.items():
        kb = out.prepared.engine.sizes[0]
        ex = np.asarray(out.prepared.trace.experts)[:48]
        want = sum(kb[c * 8 + int(e)] for row in ex for c, choice in enumerate(row) for e in choice if e >= 0)
        assert runs[assign]["transfers"]["bytes_h2d_experts"] == want


def test_same_pool_bytes_hold_more_small_experts():
    # an LRU of 96 base slots holds more experts when the popular ones are small: more hits
    plain = simulate(load_scenario(LRU, SHORT)).summary
    small = simulate(load_scenario(HMOE, SHORT)).summary
    assert small["cache"]["hits"] > plain["cache"]["hits"]
    assert small["memory"]["expert_cache_bytes"] == plain["memory"]["expert_cache_bytes"]


@pytest.mark.parametrize("size", [0.25, 0.5, 1.75, 2.0])
def test_kernel_time_is_the_roofline_of_the_resized_expert(size):
    sc = load_scenario(LRU)
    m, hw = sc.model, sc.hardware
    roof_hw = hw.model_copy(update={"expert_profile": None})  # the roofline alone
    tok = np.arange(0, 65)
    t, mb = Predictor(m, roof_hw).expert_times(tok, kernels=5, size=size)
    wide = m.model_copy(update={"moe_intermediate_size": int(m.moe_intermediate_size * size)})
    t2, mb2 = Predictor(wide, roof_hw).expert_times(tok, kernels=5)
    np.testing.assert_allclose(t, t2, rtol=1e-12)
    assert np.array_equal(mb, mb2)
    # a measured table (taken at width 1) is scaled by the roofline's ratio
    pred = Predictor(m, hw)
    assert pred.expert_source.startswith("profile table")
    t1, _ = pred.expert_times(tok, kernels=5)
    r1, _ = Predictor(m, roof_hw).expert_times(tok, kernels=5)
    ts, _ = pred.expert_times(tok, kernels=5, size=size)
    np.testing.assert_allclose(ts[1:], t1[1:] * t[1:] / r1[1:], rtol=1e-12)
    assert ts[0] == 0.0


def test_memory_counts_each_experts_own_bytes():
    out = simulate(load_scenario(LRU, [*SHORT, sets(MULT), "policies.cache.transient_buffers=3"]))
    mem = out.summary["memory"]
    base = out.prepared.scenario.model.expert_bytes
    per_layer = sum(int(round(x * base)) for x in MULT)
    assert mem["host_expert_bytes"] == 32 * per_layer == out.prepared.scenario.model.total_expert_bytes
    assert mem["transient_buffer_bytes"] == 3 * int(round(1.75 * base))
    assert mem["expert_cache_bytes"] == 96 * base
    classes = mem["expert_sizes"]["size_classes"]
    assert [c["experts"] for c in classes] == [32, 32, 32, 64, 32, 32, 32]


def test_all_resident_holds_every_expert_at_its_own_size():
    sc = ROOT / "scenarios" / "mixtral-8x7b-h100-resident-fp8.yaml"
    small = [0.25, 0.5, 0.75, 1.0, 1.0, 0.5, 0.5, 0.5]
    # CUDA graphs: eager launches of the resident run are host-bound on the H100 host (its fitted
    # per-op cost), which would hide the kernels' own time
    graph = [*SHORT, "runtime.launch_mode=graph"]
    out = simulate(load_scenario(sc, [*graph, sets(small)])).summary
    plain = simulate(load_scenario(sc, graph)).summary
    assert out["memory"]["expert_cache_bytes"] == out["memory"]["expert_sizes"]["total_expert_bytes"]
    assert out["memory"]["host_expert_bytes"] == 0 and out["cache"]["misses"] == 0
    assert out["memory"]["expert_cache_bytes"] < plain["memory"]["expert_cache_bytes"]
    assert out["tpot_ms"]["mean"] < plain["tpot_ms"]["mean"]  # smaller experts, less weight traffic


def test_expert_parallel_uses_per_expert_compute_and_placed_bytes():
    args = ["workload.max_tokens=4096"]
    plain = simulate(load_scenario(EP, args))
    half = simulate(load_scenario(EP, [*args, sets([0.5] * 8)]))
    mixed = simulate(load_scenario(EP, [*args, sets([0.25, 0.5, 0.75, 1, 1, 1, 1, 1])]))
    p, h = plain.summary, half.summary
    # contiguous placement of 8 experts on 8 GPUs: GPU g holds expert g of every layer
    base = plain.prepared.scenario.model.expert_bytes
    L = len(plain.prepared.model_layers)
    assert h["memory"]["expert_bytes"] == L * int(round(0.5 * base))
    assert mixed.summary["memory"]["expert_bytes"] == L * base
    assert p["memory"]["expert_bytes"] == L * base
    # half-size experts: every GPU's expert stage is faster, the step too
    eng_p, eng_h = plain.result, half.result
    assert eng_h.stage_s["experts"] < eng_p.stage_s["experts"]
    assert h["tpot_ms"]["mean"] < p["tpot_ms"]["mean"]
    # brute force of one layer's per-GPU expert time with sizes
    e = mixed.prepared.engine
    ex = e.experts[e.rows(0)][:, e.col_src[0], :].astype(np.int32)
    _, _, cnt, t_gpu = e._route(0, ex, None, bool((e.experts < 0).any()))
    tab, cls = e.size_tables
    want = np.array([sum(tab[cls[0, x], cnt[g, x]] for x in range(8)) for g in range(cnt.shape[0])])
    want += np.where(cnt.any(axis=1), e.expert_fixed_s, 0.0)
    np.testing.assert_allclose(t_gpu, want)


def test_expert_parallel_refuses_sizes_that_do_not_fit():
    with pytest.raises(InputError, match="does not fit"):
        simulate(load_scenario(EP, ["workload.max_tokens=4096", sets(MULT)]))


def test_slot_counting_caches_refuse_mixed_sizes_and_bad_multipliers_are_input_errors():
    with pytest.raises(InputError, match="counts expert slots"):
        simulate(load_scenario(LRU, [*SHORT, sets(MULT), "policies.cache.kind=arc"]))
    with pytest.raises(InputError, match="one expert size"):
        simulate(load_scenario(LRU, [*SHORT, sets(MULT), "policies.execution.kind=fiddler"]))
    with pytest.raises(Exception, match="expert_size_multipliers"):
        load_scenario(LRU, [*SHORT, "model.expert_size_multipliers=[1,2]"])
    with pytest.raises(Exception, match="positive"):
        load_scenario(LRU, [*SHORT, "model.expert_size_multipliers=[1,1,1,1,1,1,1,0]"])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), cap=st.integers(3, 40), warm=st.sampled_from(["none", "first", "popular"]),
       scope=st.sampled_from(["global", "per_layer"]))
def test_byte_pool_never_overflows_and_counts_match_a_brute_force_lru(seed, cap, warm, scope):
    rng = np.random.default_rng(seed)
    C, E, T = 3, 6, 40
    mult = rng.choice([0.5, 1.0, 1.5, 2.0], size=(C, E))
    sizes = ExpertSizes(mult, 10)
    ex = np.stack([np.stack([rng.permutation(E)[:2] for _ in range(C)]) for _ in range(T)])
    from moesim.engine.plan import build_plan

    plan = build_plan(ex, batch_size=1, max_tokens=T, loop_trace=False)
    setup = CacheSetup(num_columns=C, num_experts=E, expert_bytes=10, top_k=2, model_layers=tuple(range(C)),
                       max_distinct_per_step=plan.max_distinct, plan=plan, col_src=tuple(range(C)), experts=ex,
                       key_bytes=sizes.key_bytes)
    cap = max(cap, 2 * C * 4 if scope == "per_layer" else 8)
    pol = Lru(Lru.Config(capacity_experts=cap, scope=scope, warm_start=warm), setup)
    for p in pol.pools:  # warm start fills a prefix that fits
        assert p.used_bytes <= p.capacity_bytes
    t = 0
    for s in range(T):
        for c in range(C):
            need = list(dict.fromkeys(int(e) for e in ex[s, c]))
            before = set(pol.resident)
            r = pol.access(c, need, t)
            t += 1
            # every key that left the pool is reported: with its load, or as an orphan (evicted for
            # a miss that still did not fit and was streamed)
            gone = [k for _, ev in r.loads for k in ev] + list(r.orphans)
            assert len(gone) == len(set(gone))
            assert before - set(gone) | {c * E + e for e, _ in r.loads} == set(pol.resident)
            for p in pol.pools:
                assert p.used_bytes == sum(sizes.key_bytes[k] for k in p.order) <= p.capacity_bytes
            assert set(r.hits) | {e for e, _ in r.loads} | set(r.streamed) == set(need)
    if scope == "global" and warm == "none":
        misses, _ = brute_force_lru(ex, cap * 10, lambda k: sizes.key_bytes[k], E)
        pol2 = Lru(Lru.Config(capacity_experts=cap), setup)
        n = 0
        t = 0
        for s in range(T):
            for c in range(C):
                r = pol2.access(c, list(dict.fromkeys(int(e) for e in ex[s, c])), t)
                t += 1
                n += len(r.loads) + len(r.streamed)
        assert n == misses
