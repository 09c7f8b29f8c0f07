"""llama.cpp -ngl (n_gpu_layers): whole blocks on the CPU, the hidden state over the link at each
CPU/GPU boundary, memory split between HBM and host DRAM."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.policies.execution.llamacpp import llamacpp_layout
from tests.conftest import ROOT

QWEN = ROOT / "scenarios" / "qwen3-30b-a3b-rtx4080-llamacpp-ngl44.yaml"
MIXTRAL = ROOT / "scenarios" / "mixtral-8x7b-rtx4090-llamacpp-ncpumoe24.yaml"
SHORT = ["workload.max_tokens=12", "workload.warmup_tokens=2"]
L = 48  # Qwen3-30B-A3B blocks


def run(path, *sets, timeline=False):
    return simulate(load_scenario(path, [*SHORT, *sets]), record_timeline=timeline)


def ngl(n, order="output_first", *sets, timeline=False):
    return run(QWEN, f"policies.execution.n_gpu_layers={n}", f"policies.execution.ngl_order={order}", *sets,
               timeline=timeline)


def devices(n, order, layers=L):
    """Brute force from llama.cpp's rule: of layers 0..L (L = the output layer) the last ones go to
    the GPU; output_first counts the output layer as the first offloaded."""
    n = min(n, layers + 1)
    if order == "output_first":
        on = set(range(layers + 1 - n, layers + 1)) if n else set()
    else:
        on = set(range(layers - n, layers)) if n <= layers else set(range(layers + 1))
    return [i in on for i in range(layers + 1)]


def same_run(a, b):
    """Every key of today's summary is equal (the new one may add its ``execution`` block)."""
    skip = {"wall_time_s", "scenario_hash"}
    assert {k for k in a if k not in skip} <= set(b)
    assert {k for k in b if k not in a} <= {"execution"}
    for k in a:
        if k not in skip:
            assert a[k] == b[k], k


@pytest.mark.parametrize("sets", [["policies.execution.n_gpu_layers=33"], ["policies.execution.n_gpu_layers=99"],
                                  ["policies.execution.n_gpu_layers=33", "policies.execution.ngl_order=blocks_first"]])
def test_all_layers_on_the_gpu_is_todays_run(sets):
    # Mixtral has 32 blocks: -ngl 33 (or more) offloads every layer, the output layer included
    same_run(run(MIXTRAL).summary, run(MIXTRAL, *sets).summary)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 120), order=st.sampled_from(["output_first", "blocks_first"]))
def test_layout_follows_llamacpps_rule(n, order):
    sc = load_scenario(QWEN, [f"policies.execution.n_gpu_layers={n}", f"policies.execution.ngl_order={order}"])
    lay = llamacpp_layout(sc, list(sc.model.moe_layers), "test")
    d = devices(n, order)
    assert [lay.block_on_gpu(b) for b in range(L)] == d[:L]
    assert lay.head_on_gpu == d[L]
    assert lay.host_expert_layers == tuple(b for b in range(L) if not d[b])  # a CPU block's experts too
    assert lay.offloaded() == f"offloaded {sum(d)}/49 layers to GPU"
    assert lay.boundaries() == sum(1 for a, b in pairwise(d) if a != b)


def test_the_summary_reports_the_layout():
    ex = ngl(40).summary["execution"]
    assert ex["cpu_blocks"] == 9 and ex["output_layer"] == "gpu"
    assert ex["layers_on_gpu"] == "offloaded 40/49 layers to GPU"


def test_tpot_rises_as_fewer_layers_are_on_the_gpu():
    # a memory-bound host (the preset's Ryzen at half its peak's use instead of a quarter): every
    # CPU block's weights and KV over DRAM bandwidth take longer than its FLOPs over peak
    host = "hardware.cpu.compute_efficiency=0.5"
    prep = ngl(44, "output_first", host).prepared
    m, cpu = prep.scenario.model, prep.scenario.hardware.cpu
    flops_s = cpu.peak_gflops_fp32 * 1e9 * cpu.compute_efficiency
    for b in range(L):
        params = m.block_dense_params(b)
        assert params * m.bytes_per_param / (cpu.dram_bandwidth_gb_s * 1e9) > 2 * params / flops_s
    assert m.expert_bytes / (cpu.dram_bandwidth_gb_s * 1e9) > m.expert_flops(1) / flops_s
    p = prep.predictor
    assert p.cpu_block_dense(0, 1) > p.block_dense(0, 1, 1).time_s
    for order in ("output_first", "blocks_first"):
        prev = None
        for n in (45, 44, 40, 32, 24, 16, 8, 2, 1, 0):
            t = ngl(n, order, host, "policies.cache.cpu_moe_layers=4").summary["tpot_ms"]["mean"]
            if prev is not None:
                assert t > prev, (order, n)
            prev = t


@pytest.mark.parametrize("n,order,batch", [(44, "output_first", 1), (1, "output_first", 1), (0, "output_first", 1),
                                           (40, "blocks_first", 1), (48, "blocks_first", 3), (20, "output_first", 4)])
def test_link_bytes_are_boundaries_times_hidden_state(n, order, batch):
    # 2-bit experts: every split fits the 16 GB GPU without --n-cpu-moe (whose copies would add bytes)
    out = ngl(n, order, "model.expert_dtype=q2_k", f"workload.batch_size={batch}", "workload.max_tokens=24",
              "workload.warmup_tokens=6", timeline=True)
    s = out.summary
    d = devices(n, order)
    up = sum(1 for a, b in pairwise(d) if not a and b)  # CPU -> GPU: the hidden state goes up
    down = sum(1 for a, b in pairwise(d) if a and not b)
    assert s["execution"]["boundaries_per_step"] == up + down
    hidden = out.prepared.engine.act_bytes_per_token
    steps = s["tokens"] // batch
    assert s["transfers"]["bytes_h2d"] == up * hidden * batch * steps
    assert s["transfers"]["bytes_d2h"] == down * hidden * batch * steps
    assert s["transfers"]["copies"] == 0
    rows = [r for r in out.result.timeline if r[1] in ("act_h2d", "act_d2h")]
    assert len(rows) == (up + down) * out.result.steps  # warm-up steps too


def test_cpu_blocks_run_their_experts_on_the_cpu():
    s = ngl(40).summary
    cpu_blocks = L - 39
    for p in s["per_layer"]:
        if p["layer"] < cpu_blocks:
            assert p["cpu_executed"] == p["accesses"] > 0
        else:
            assert p["cpu_executed"] == 0
    assert s["execution"]["host_expert_layers"] == list(range(cpu_blocks))


def test_all_on_the_cpu_equals_a_brute_force_sum():
    # -ngl 0: every block and the output layer on the CPU, one after another on the host thread;
    # a step = sum over blocks (weights + KV over DRAM, experts) + output layer + token read-back
    out = ngl(0)
    prep, res = out.prepared, out.result
    p, st = prep.predictor, prep.engine.stage
    wl, hw = prep.scenario.workload, prep.scenario.hardware
    assert prep.engine.stage.offload.head_cpu is not None
    starts = np.concatenate([[0.0], res.step_end_s[:-1]])
    for s_ in range(res.steps):
        ctx = wl.context_tokens + s_
        t = 0.0
        for c, lay in enumerate(prep.model_layers):
            t += p.cpu_block_dense(lay, 1) + float(p.cpu_attention_core(1, [ctx])[0])
            _, counts = prep.plan.row(s_, prep.col_src[c])
            t += sum(st.cpu_expert[k] for k in counts)
        t += p.cpu_head(1) + hw.host.router_readback_us * 1e-6
        assert res.step_end_s[s_] - starts[s_] == pytest.approx(t, rel=1e-12)
    cp = out.summary["critical_path_ms"]
    assert cp["gpu_compute"] == 0.0
    assert cp["host"] == pytest.approx(hw.host.router_readback_us * 1e-3 * out.summary["tokens"])


def test_the_gpu_waits_for_the_cpu_blocks_and_the_parts_sum():
    out = ngl(30, "output_first", timeline=True)
    tl = out.result.timeline
    for s_ in range(out.result.steps):
        cpu_end = max(r[3] for r in tl if r[4] == s_ and r[0] == "cpu0")
        first_gpu = min(r[2] for r in tl if r[4] == s_ and r[0] == "gpu0.compute")
        assert first_gpu >= cpu_end  # ggml runs the splits one after another
    cp = out.summary["critical_path_ms"]
    parts = sum(v for k, v in cp.items() if k != "total")
    assert parts == pytest.approx(cp["total"], rel=1e-9)
    prev = 0.0
    for n in (40, 30, 10):  # CPU block time is booked as cpu_expert
        u = ngl(n).summary["critical_path_ms"]["cpu_expert"]
        assert u > prev
        prev = u


def test_memory_fits_only_with_fewer_layers_on_the_gpu():
    with pytest.raises(InputError, match="does not fit in GPU memory") as ei:
        run(QWEN, "policies.execution.n_gpu_layers=49")
    assert ei.value.field == "policies.execution.n_gpu_layers"
    out = ngl(44)
    mem = out.summary["memory"]
    m, wl = out.prepared.scenario.model, out.prepared.scenario.workload
    gpu_blocks, cpu_blocks = 43, 5
    tok = wl.batch_size * (wl.context_tokens + wl.max_tokens // wl.batch_size)
    assert mem["kv_bytes"] == tok * m.kv_bytes_per_token_layer * gpu_blocks
    assert mem["host_kv_bytes"] == tok * m.kv_bytes_per_token_layer * cpu_blocks
    host_dense = round(sum(m.block_dense_params(b) for b in range(cpu_blocks)) * m.bytes_per_param)
    assert mem["host_dense_bytes"] == host_dense
    assert mem["dense_bytes"] == m.dense_bytes - host_dense
    assert mem["expert_cache_bytes"] == gpu_blocks * m.num_experts * m.expert_bytes
    assert mem["host_expert_bytes"] == cpu_blocks * m.num_experts * m.expert_bytes
    assert mem["gpu_used_bytes"] <= mem["gpu_usable_bytes"]


def test_the_output_layer_on_the_cpu_leaves_the_gpu_and_comes_back():
    s = ngl(48, "blocks_first", "model.expert_dtype=q2_k").summary
    m = load_scenario(QWEN).model
    assert s["memory"]["host_dense_bytes"] == round(m.vocab_size * m.hidden_size * m.embedding_bytes_per_param)
    assert s["execution"]["output_layer"] == "cpu"


@pytest.mark.parametrize("sets,field,match", [
    (["policies.cache.kind=lru", "policies.cache.capacity_experts=512", "policies.execution.n_gpu_layers=40"],
     "policies.execution.n_gpu_layers", "all_resident"),
    (["policies.execution.n_gpu_layers=40", "runtime.dense_weights=streamed"],
     "policies.execution.n_gpu_layers", "streamed"),
    (["policies.execution.n_gpu_layers=40",
      "workload.requests={arrival: {kind: poisson, rate_per_s: 1}, num_requests: 2}"],
     "policies.execution.n_gpu_layers", "fixed-batch"),
])
def test_what_is_not_modelled_is_refused(sets, field, match):
    sc = load_scenario(QWEN, [*SHORT, *sets])
    with pytest.raises(InputError, match=match) as ei:
        simulate(sc)
    assert ei.value.field == field
