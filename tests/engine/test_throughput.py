"""Throughput-mode systems (MoE-Lightning, Klotski, MoE-Gen) in the throughput engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.engine.throughput import ThroughputContext, ThroughputCosts, prepare_throughput
from moesim.errors import InputError
from moesim.policies.base import registry
from moesim.traces.format import Trace, save_trace
from tests.conftest import ROOT

SC = ROOT / "scenarios"
LIGHTNING = SC / "mixtral-8x7b-t4-moe-lightning.yaml"
KLOTSKI = SC / "mixtral-8x7b-t4-klotski.yaml"
MOE_GEN = SC / "mixtral-8x7b-t4-moe-gen.yaml"
MODEL_BATCHING = SC / "mixtral-8x7b-t4-model-batching.yaml"
SHORT = ["model.num_layers=4", "trace={synthetic: {tokens: 1024, zipf_s: 0.8, reuse_prob: 0.1}}"]


def run(path, sets=(), **kw):
    return simulate(load_scenario(path, list(sets)), **kw)


def _ctx(path, sets=()):
    """A bare context (no schedule built) for the analytic models."""
    sc = load_scenario(path, list(sets))
    costs = ThroughputCosts(sc.model, sc.hardware, sc.runtime)
    ctx = ThroughputContext(sc, costs, np.zeros((1, 1, 1), dtype=np.int64), {}, "test")
    ctx.steps = sc.policies.execution.decode_steps
    policy = registry("execution")[sc.policies.execution.kind](sc.policies.execution, None)
    return ctx, policy


# ----- every bundled throughput scenario --------------------------------------------------------------------
@pytest.mark.parametrize("path", [LIGHTNING, KLOTSKI, MOE_GEN, MODEL_BATCHING], ids=lambda p: p.stem)
def test_scenarios_run_and_report_every_key(path):
    out = run(path)
    s = out.summary
    for k in ("schema_version", "scenario", "scenario_hash", "seed", "moesim_version", "wall_time_s",
              "events_processed", "sim_time_s", "tokens", "requests", "layer_steps", "tpot_ms", "ttft_ms",
              "e2e_ms", "throughput_tok_s", "cache", "transfers", "utilization", "critical_path_ms", "per_layer",
              "routing_note", "throughput", "memory"):
        assert k in s, k
    assert s["ttft_ms"] is None and s["e2e_ms"] is None
    assert s["throughput_tok_s"] == pytest.approx(s["tokens"] / s["measured_time_s"])
    cp = s["critical_path_ms"]
    assert sum(v for k, v in cp.items() if k != "total") == pytest.approx(cp["total"], rel=1e-9)
    assert s["memory"]["gpu_used_bytes"] <= s["memory"]["gpu_usable_bytes"]
    assert s["memory"]["host_used_bytes"] <= s["memory"]["host_capacity_bytes"]
    t = s["transfers"]
    assert t["bytes_h2d"] == sum(s["throughput"]["h2d_bytes_by_kind"].values())
    assert t["bytes_d2h"] == sum(s["throughput"]["d2h_bytes_by_kind"].values())
    # every op waited only for ops that had finished, and each resource ran one op at a time
    eng = out.prepared.engine
    d = eng.dag
    for i in range(len(d)):
        assert all(eng.end[j] <= eng.start[i] + 1e-12 for j in d.deps[i])
    for r in set(d.res):
        idx = [i for i in range(len(d)) if d.res[i] == r]
        assert all(eng.start[b] >= eng.end[a] - 1e-12 for a, b in zip(idx, idx[1:]))


def test_deterministic_summary():
    a = run(KLOTSKI, SHORT).summary
    b = run(KLOTSKI, SHORT).summary
    a.pop("wall_time_s")
    b.pop("wall_time_s")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_bad_input_is_one_line_error():
    with pytest.raises(InputError, match="policies.cache.kind.*streaming"):
        run(LIGHTNING, ["policies.cache.kind=lru", "policies.cache.capacity_experts=16"])
    with pytest.raises(InputError, match="workload.requests"):
        prepare_throughput(load_scenario(KLOTSKI, ["workload.requests={arrival: {kind: poisson, rate_per_s: 1}, "
                                                   "num_requests: 2, prompt_tokens: 8, output_tokens: 4}"]))


def test_cli_exit_code_2_on_bad_input(tmp_path, capsys):
    from moesim.cli import main

    code = main(["run", str(KLOTSKI), "--set", "policies.execution.batches=64", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit in GPU memory" in err[0] and "policies.execution.batches" in err[0]
    assert not (tmp_path / "o").exists()


# ----- MoE-Lightning ---------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bw=st.floats(2.0, 64.0), hbm=st.floats(10.0, 48.0), host=st.floats(100.0, 400.0),
       dram=st.floats(20.0, 140.0), context=st.integers(16, 4096), layers=st.integers(1, 3))
def test_lightning_search_equals_exhaustive_best(bw, hbm, host, dram, context, layers):
    sets = [f"hardware.link.h2d_bandwidth_gb_s={bw}", f"hardware.gpu.hbm_gib={hbm}",
            f"hardware.host_memory.capacity_gib={host}", f"hardware.cpu.dram_bandwidth_gb_s={dram}",
            f"workload.context_tokens={context}", f"model.num_layers={layers}",
            "policies.execution.max_micro_batches=24", "policies.execution.micro_batch_sizes=[8,32,128]",
            "policies.execution.resident_layer_options=[0,1,2]"]
    ctx, pol = _ctx(LIGHTNING, sets)
    p, est, _ = pol.search(ctx)
    q, ref = pol.exhaustive(ctx)
    if q is None:
        assert p is None
        return
    assert est["throughput_tok_s"] == pytest.approx(ref["throughput_tok_s"], rel=1e-12)
    assert pol.fits(ctx, p)


def test_lightning_hrm_throughput_never_falls_with_micro_batches():
    ctx, pol = _ctx(LIGHTNING)
    from moesim.policies.execution.moe_lightning import LightningPolicy

    for att in ("cpu", "gpu", "gpu_kv_streamed"):
        tps = [pol.hrm(ctx, LightningPolicy(n, 64, att, 0))["throughput_tok_s"] for n in range(1, 40)]
        assert all(b >= a * (1 - 1e-12) for a, b in zip(tps, tps[1:])), att


def test_cpu_attention_wins_when_kv_does_not_fit():
    """At the batch the CPU-attention policy reaches, the KV cache does not fit next to the weight
    buffers on the T4: GPU attention with a resident KV cache cannot run it, and streaming the KV in
    for GPU attention is slower than attention on the CPU (analytically and simulated)."""
    fixed = ["policies.execution.search=false", "policies.execution.micro_batch=128",
             "policies.execution.micro_batches=8"]
    with pytest.raises(InputError, match="does not fit in GPU memory.*kv_cache"):
        run(LIGHTNING, fixed + ["policies.execution.attention=gpu"])
    cpu = run(LIGHTNING, fixed + ["policies.execution.attention=cpu"]).summary
    gpu = run(LIGHTNING, fixed + ["policies.execution.attention=gpu_kv_streamed"]).summary
    assert cpu["throughput_tok_s"] > 1.5 * gpu["throughput_tok_s"]
    assert cpu["critical_path_ms"]["cpu_attention"] > 0 and gpu["critical_path_ms"]["cpu_attention"] == 0
    assert gpu["transfers"]["bytes_h2d_kv"] > 0 and cpu["transfers"]["bytes_h2d_kv"] == 0
    # the search agrees: the best GPU-attention policy is worse than the best CPU-attention one
    ctx, pol = _ctx(LIGHTNING)
    pol.config.attention_options = ["gpu", "gpu_kv_streamed"]
    _, g_est, _ = pol.search(ctx)
    pol.config.attention_options = ["cpu"]
    _, c_est, _ = pol.search(ctx)
    assert c_est["throughput_tok_s"] > g_est["throughput_tok_s"]
    s = run(LIGHTNING).summary
    assert s["throughput"]["policy"]["attention"] == "cpu"


def test_lightning_throughput_rises_with_batch_until_memory_bound():
    base = ["policies.execution.search=false", "policies.execution.micro_batch=64", "policies.execution.attention=cpu"]
    tps = []
    for n in (1, 2, 4, 8, 16, 24):
        tps.append(run(LIGHTNING, base + [f"policies.execution.micro_batches={n}"]).summary["throughput_tok_s"])
    assert all(b > a for a, b in zip(tps, tps[1:]))
    assert tps[-1] > 8 * tps[0]
    # the KV cache of 64 x 27 sequences does not fit in the 192 GiB host next to the weights
    with pytest.raises(InputError, match="does not fit in host memory"):
        run(LIGHTNING, base + ["policies.execution.micro_batches=27"])


def test_lightning_simulation_close_to_its_hrm_estimate():
    s = run(LIGHTNING).summary
    est = s["throughput"]["hrm"]["throughput_tok_s"]
    assert s["throughput_tok_s"] == pytest.approx(est, rel=0.15)
    assert s["throughput_tok_s"] <= est * 1.001  # the pipeline adds bubbles, never removes the bound


# ----- Klotski -------------------------------------------------------------------------------------------------
def _all_experts_trace(tmp_path, rows=64, layers=32, experts=8, k=2):
    """Every 4 consecutive rows cover all 8 experts at every layer (so any batch of >= 4 rows does)."""
    x = np.zeros((rows, layers, k), dtype=np.int32)
    for r in range(rows):
        x[r, :, 0] = (2 * r) % experts
        x[r, :, 1] = (2 * r + 1) % experts
    p = tmp_path / "all.npz"
    save_trace(Trace(experts=x, meta={"model": "mixtral-8x7b", "num_experts": experts, "top_k": k,
                                      "layers": list(range(layers)), "source": "test"}), p)
    return p


def _brute_bytes(out) -> int:
    """H2D bytes of the measured steps from the trace: each block's dense weights, each distinct
    expert of the batches' union once, plus every prefetched expert."""
    prep = out.prepared
    ctx, c = prep.ctx, prep.ctx.costs
    x = ctx.routing.x
    total = 0
    N = ctx.sequences
    for s in range(ctx.warmup_steps, ctx.steps):
        for b in range(c.L):
            total += c.dense_w[b]
            col = ctx.col_of_block.get(b)
            if col is not None:
                rows = x[s * N:(s + 1) * N, col].ravel()
                union = len(set(rows[rows >= 0].tolist()))
                a = ctx.access[(s, b)]
                total += (union - a.prefetch_used + a.prefetch_issued) * c.expert_bytes
    return total


@pytest.mark.parametrize("prefetch", [0, 2])
def test_klotski_io_bytes_match_the_trace(prefetch):
    out = run(KLOTSKI, [f"policies.execution.prefetch_hot={prefetch}", "policies.execution.batches=3"])
    assert out.summary["transfers"]["bytes_h2d"] == _brute_bytes(out)
    c = out.summary["cache"]
    assert c["prefetch_used"] + c["prefetch_wasted"] == c["prefetch_issued"]
    if prefetch == 0:
        assert c["prefetch_issued"] == 0


def test_klotski_io_bytes_per_token_fall_as_one_over_n(tmp_path):
    tr = _all_experts_trace(tmp_path)
    base = [f"trace.path={tr}", "policies.execution.prefetch_hot=0", "workload.batch_size=4"]
    per_tok = {}
    for n in (1, 2, 4, 8):
        s = run(KLOTSKI, base + [f"policies.execution.batches={n}"]).summary
        per_tok[n] = s["transfers"]["bytes_h2d"] / s["tokens"]
    for n in (2, 4, 8):
        assert per_tok[n] * n == pytest.approx(per_tok[1], rel=1e-12)


def test_klotski_step_time_per_token_never_rises_with_batches_until_memory_runs_out():
    sets = ["policies.execution.prefetch_hot=2"]
    ctx, pol = _ctx(KLOTSKI)
    fits = [n for n in range(1, 12) if ctx.fits(*pol.memory(ctx, n), ctx.gpu_usable, ctx.host_capacity)]
    nmax = fits[-1]
    assert nmax == 8 and fits == list(range(1, nmax + 1))
    per_tok = []
    for n in range(1, nmax + 1):
        s = run(KLOTSKI, sets + [f"policies.execution.batches={n}"]).summary
        per_tok.append(s["throughput"]["step_time_per_token_ms"])
    assert all(b <= a * (1 + 1e-9) for a, b in zip(per_tok, per_tok[1:]))
    assert per_tok[-1] < per_tok[0] / 4
    with pytest.raises(InputError, match="does not fit in GPU memory.*kv_cache"):
        run(KLOTSKI, sets + [f"policies.execution.batches={nmax + 1}"])


def test_klotski_hot_first_and_prefetch_help():
    base = ["policies.execution.batches=4"]
    hot = run(KLOTSKI, base + ["policies.execution.prefetch_hot=2", "policies.execution.order=hot_first"]).summary
    none = run(KLOTSKI, base + ["policies.execution.prefetch_hot=0"]).summary
    assert hot["cache"]["prefetch_issued"] > 0
    assert hot["throughput_tok_s"] >= none["throughput_tok_s"]


def test_klotski_planner_picks_fewest_batches_that_hide_io():
    # with a fast link, a few batches' compute covers a block's I/O
    s = run(KLOTSKI, ["hardware.link.h2d_bandwidth_gb_s=400"]).summary["throughput"]
    assert s["planner"] == "compute covers I/O"
    assert s["estimated_block_compute_ms"] >= s["estimated_block_io_ms"]
    ctx, pol = _ctx(KLOTSKI, ["hardware.link.h2d_bandwidth_gb_s=400"])
    n = s["batches"]
    if n > 1:
        comp, io = pol.estimate(ctx, n - 1)
        assert comp < io


# ----- MoE-Gen ---------------------------------------------------------------------------------------------------
def test_moe_gen_beats_model_batching_at_equal_memory():
    gen = run(MOE_GEN).summary
    base = run(MODEL_BATCHING).summary
    assert gen["throughput_tok_s"] > 2 * base["throughput_tok_s"]
    # the same machine: both fit in the same GPU memory; the baseline's batch is what fits there
    assert gen["memory"]["gpu_usable_bytes"] == base["memory"]["gpu_usable_bytes"]
    assert base["throughput"]["model_batch"] < gen["throughput"]["sequences"]
    ctx, pol = _ctx(MODEL_BATCHING)
    n = base["throughput"]["model_batch"]
    assert not ctx.fits(*pol.memory(ctx, n + 1), ctx.gpu_usable, ctx.host_capacity)


@pytest.mark.parametrize("sets", [[], ["policies.execution.attention_batch=48", "policies.execution.expert_batch=200",
                                       "workload.batch_size=300"]])
def test_moe_gen_every_token_passes_every_module_once_per_layer(sets):
    out = run(MOE_GEN, SHORT + sets)
    s = out.summary
    ctx = out.prepared.ctx
    N, W, S = ctx.sequences, ctx.warmup_steps, ctx.steps
    x = ctx.routing.x
    for row in s["per_layer"]:
        assert row["attention_tokens"] == N * (S - W)
        col = row["trace_column"]
        routed = x[W * N:S * N, col]
        assert row["routed_tokens"] == int((routed >= 0).sum())
    # each attention batch covers its sequences once: chunks partition the sequences
    d = out.prepared.engine.dag
    for s_ in range(S):
        for b in range(ctx.costs.L):
            toks = [d.tokens[i] for i in range(len(d)) if d.kind[i] == "attn_module" and d.step[i] == s_
                    and d.layer[i] == b]
            assert sum(toks) == N
            ex = [d.tokens[i] for i in range(len(d)) if d.kind[i] == "experts" and d.step[i] == s_ and d.layer[i] == b]
            assert sum(ex) == N


# ----- review fixes: memory sizing, input checks, event count, critical path ----------------------------
@pytest.mark.parametrize("path", [LIGHTNING, KLOTSKI, MOE_GEN, MODEL_BATCHING], ids=lambda p: p.stem)
def test_memory_check_sizes_the_kv_cache_for_the_final_context(path):
    """The memory check (and its report) holds the KV cache of every decode step of the run: the
    policies size it before the run is fixed, which once used the prompt length alone."""
    out = run(path)
    s = out.summary
    mem = s["memory"]
    kv = mem["gpu"].get("kv_cache", 0) + mem["host"].get("kv_cache", 0)
    ctx = out.prepared.ctx
    assert ctx.final_context == ctx.wl.context_tokens + ctx.steps
    assert kv == s["throughput"]["kv_cache_bytes"] == ctx.sequences * ctx.final_context * ctx.costs.kv_token
    if path == MODEL_BATCHING:  # the most sequences whose KV (at the final context) fits, not one more
        n = s["throughput"]["model_batch"]
        _, pol = _ctx(MODEL_BATCHING)
        assert ctx.fits(*pol.memory(ctx, n), ctx.gpu_usable, ctx.host_capacity)
        assert not ctx.fits(*pol.memory(ctx, n + 1), ctx.gpu_usable, ctx.host_capacity)


@pytest.mark.parametrize("path,sets", [
    (MODEL_BATCHING, ["policies.execution.model_batch=0"]),
    (MODEL_BATCHING, ["policies.execution.model_batch=-3"]),
    (LIGHTNING, ["policies.execution.micro_batch_sizes=[0,16]"]),
])
def test_empty_batches_are_input_errors(path, sets):
    with pytest.raises(InputError, match="model_batch|micro_batch_sizes"):
        run(path, sets)


def test_events_processed_is_simpys_count(monkeypatch):
    import simpy

    steps = [0]
    orig = simpy.Environment.step

    def counting(self):
        orig(self)  # raises EmptySchedule when nothing is left: not an event
        steps[0] += 1

    monkeypatch.setattr(simpy.Environment, "step", counting)
    for path in (LIGHTNING, MOE_GEN):
        steps[0] = 0
        s = run(path, SHORT).summary
        assert s["events_processed"] == steps[0]


SLOW_CPU = ["policies.execution.search=false", "policies.execution.micro_batch=64", "policies.execution.micro_batches=4",
            "policies.execution.attention=cpu", "hardware.cpu.dram_bandwidth_gb_s=2",
            "hardware.link.h2d_bandwidth_gb_s=64"] + SHORT


@pytest.mark.parametrize("path,sets", [(LIGHTNING, []), (LIGHTNING, SLOW_CPU), (KLOTSKI, []), (MOE_GEN, SHORT),
                                       (MODEL_BATCHING, SHORT)])
def test_critical_path_charges_a_resource_no_more_than_it_was_busy(path, sets):
    """Each cause of the critical path is time its resource spent running ops (in the measured
    window); a CPU-bound CGOPipe is charged to the CPU, not to the copy that brings attention back."""
    s = run(path, sets).summary
    cp, u, T = s["critical_path_ms"], s["utilization"], s["critical_path_ms"]["total"]
    tol = 1e-9 * T
    assert cp["gpu_compute"] <= u["gpu0.compute"] * T + tol
    assert cp["copy_wait"] <= (u.get("gpu0.h2d", 0) + u.get("gpu0.d2h", 0)) * T + tol
    assert cp["cpu_attention"] <= u.get("cpu0", 0) * T + tol
    if sets is SLOW_CPU:  # attention on a CPU with 2 GB/s of DRAM bounds the run
        assert u["cpu0"] > 0.9 and cp["cpu_attention"] > 0.8 * T


def test_a_run_longer_than_the_trace_needs_loop_trace():
    with pytest.raises(InputError, match=r"workload\.loop_trace: false, but this run needs \d+ trace rows") as ei:
        run(LIGHTNING, ["workload.loop_trace=false"])
    assert "\n" not in str(ei.value)
