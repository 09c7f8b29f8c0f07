"""Engine invariants on real presets: bytes, time order, critical path, policy ordering,
determinism, host costs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from tests.conftest import ROOT

SC = ROOT / "scenarios"
SHORT = ["workload.max_tokens=96", "workload.warmup_tokens=8"]


def run(name, *sets, timeline=True):
    sc = load_scenario(SC / name, [*SHORT, *sets])
    return simulate(sc, record_timeline=timeline)


def _by_resource(tl, resource):
    return sorted((r for r in tl if r[0] == resource), key=lambda r: (r[2], r[3]))


@pytest.mark.parametrize("name", ["mixtral-8x7b-h100-lru-c32.yaml", "mixtral-8x7b-h100-streaming.yaml",
                                  "olmoe-1b-7b-rtx4090-lru-c512.yaml"])
def test_bytes_time_order_and_link_rate(name):
    out = run(name)
    s, res, tl = out.summary, out.result, out.result.timeline
    xb = s["transfers"]["expert_bytes"]
    c = res.counters
    # bytes moved = loads x expert bytes, in the counters and in the timeline
    assert s["transfers"]["bytes_h2d_experts"] == s["transfers"]["copies"] * xb
    assert s["transfers"]["bytes_h2d"] == s["transfers"]["bytes_h2d_experts"]  # no CPU experts here
    assert s["transfers"]["copies"] == s["cache"]["misses"] + s["cache"]["prefetch_issued"]
    warm = res.warmup_steps
    copy_rows = [r for r in tl if r[0] == "gpu0.h2d" and r[4] >= warm]
    assert sum(r[7] for r in copy_rows) == c["bytes_h2d"]
    hw = out.prepared.scenario.hardware
    min_copy = hw.link.setup_us * 1e-6 + xb / (hw.link.h2d_bandwidth_gb_s * 1e9)
    for resource in ("gpu0.compute", "gpu0.h2d"):
        rows = _by_resource(tl, resource)
        for a, b in zip(rows, rows[1:]):
            assert a[2] <= a[3] <= b[2] + 1e-15  # in-order stream: no overlap, time forward
    for r in copy_rows:
        # the link never carries more than its bandwidth
        assert r[3] - r[2] >= min_copy * (1 - 1e-12)
    # step ends increase
    assert np.all(np.diff(res.step_end_s) > 0)


def test_critical_path_sums_to_total():
    for name in ("mixtral-8x7b-h100-lru-c96.yaml", "mixtral-8x7b-h100-streaming.yaml"):
        cp = run(name, timeline=False).summary["critical_path_ms"]
        parts = sum(cp[k] for k in ("gpu_compute", "copy_wait", "host", "cpu_expert", "comm", "idle"))
        assert parts == pytest.approx(cp["total"], rel=1e-9)


def test_policy_ordering_streaming_lru_resident():
    fp8 = ["model.expert_dtype=fp8"]
    stream = run("mixtral-8x7b-h100-streaming.yaml", *fp8, timeline=False).summary["tpot_ms"]["mean"]
    lru = run("mixtral-8x7b-h100-lru-c96.yaml", *fp8, timeline=False).summary["tpot_ms"]["mean"]
    res = run("mixtral-8x7b-h100-resident-fp8.yaml", timeline=False).summary["tpot_ms"]["mean"]
    assert stream > lru > res


def test_lru_hit_rate_grows_with_capacity():
    rates = [run(f"mixtral-8x7b-h100-lru-c{c}.yaml", timeline=False).summary["cache"]["hit_rate"] for c in (32, 96, 192)]
    assert rates[0] < rates[1] < rates[2]


def test_same_seed_same_summary():
    a = run("olmoe-1b-7b-rtx4090-lru-c512.yaml", timeline=False).summary
    b = run("olmoe-1b-7b-rtx4090-lru-c512.yaml", timeline=False).summary
    a.pop("wall_time_s"), b.pop("wall_time_s")
    assert a == b
    c = run("olmoe-1b-7b-rtx4090-lru-c512.yaml", "seed=1", timeline=False).summary
    assert c["scenario_hash"] != a["scenario_hash"]
    assert c["cache"] != a["cache"]  # the synthetic trace follows the seed


NO_HOST = [
    "hardware.host.launch_us=0", "hardware.host.eager_op_us=0", "hardware.host.graph_launch_us=0",
    "hardware.host.copy_issue_us=0", "hardware.host.router_readback_us=0",
]


def _gpu_busy(tl, warm):
    return sum(r[3] - r[2] for r in tl if r[0] == "gpu0.compute" and r[4] >= warm)


def test_all_resident_without_host_costs_is_sum_of_gpu_times():
    out = run("mixtral-8x7b-h100-resident-fp8.yaml", *NO_HOST)
    res = out.result
    total = res.step_end_s[-1] - res.measure_start_s
    busy = _gpu_busy(res.timeline, res.warmup_steps)
    assert total == pytest.approx(busy, rel=1e-12)
    # and the op durations are the predictor's times: dense stages + experts + tail
    st_ = out.prepared.engine.stage
    plan = out.prepared.plan
    exp = 0.0
    for s in range(res.warmup_steps, plan.steps):
        exp += sum(st_.dense_base[c] + st_.dense_blocks[c] * st_.attn[s] for c in range(len(st_.dense_base)))
        exp += st_.tail_base + st_.tail_blocks * st_.attn[s]
        for c, src in enumerate(out.prepared.col_src):
            _, counts = plan.row(s, src)
            exp += sum(st_.expert[k] for k in counts)
    assert total == pytest.approx(exp, rel=1e-9)
    with_host = run("mixtral-8x7b-h100-resident-fp8.yaml").summary["measured_time_s"]
    assert with_host >= total


@settings(max_examples=15, deadline=None)
@given(
    launch=st.floats(0, 30), issue=st.floats(0, 30), readback=st.floats(0, 60),
    mode=st.sampled_from(["eager", "graph", "fused"]), cap=st.sampled_from([32, 96]),
)
def test_host_costs_never_make_it_faster(launch, issue, readback, mode, cap):
    # Timing is a max-plus system of non-negative delays, hence monotone in the host costs -- except
    # through copy interference (a later kernel can overlap a copy less), which is switched off here.
    base = [f"runtime.launch_mode={mode}", "workload.max_tokens=24", "workload.warmup_tokens=0",
            "hardware.gpu.copy_interference.memory_bound_slowdown=1",
            "hardware.gpu.copy_interference.compute_bound_slowdown=1"]
    name = f"mixtral-8x7b-h100-lru-c{cap}.yaml"
    free = simulate(load_scenario(SC / name, [*base, *NO_HOST])).summary
    costly = simulate(load_scenario(SC / name, [
        *base, f"hardware.host.launch_us={launch}", f"hardware.host.eager_op_us={launch}",
        f"hardware.host.graph_launch_us={launch}",
        f"hardware.host.copy_issue_us={issue}", f"hardware.host.router_readback_us={readback}",
    ])).summary
    assert costly["measured_time_s"] >= free["measured_time_s"] * (1 - 1e-12)
    cp = costly["critical_path_ms"]
    assert sum(cp[k] for k in ("gpu_compute", "copy_wait", "host", "cpu_expert", "comm", "idle")) == pytest.approx(cp["total"], rel=1e-9)


def test_summary_busy_matches_timeline():
    out = run("mixtral-8x7b-h100-lru-c32.yaml")
    res = out.result
    warm = res.warmup_steps
    window = res.step_end_s[-1] - res.measure_start_s
    for resource in ("gpu0.compute", "gpu0.h2d"):
        busy = sum(r[3] - r[2] for r in res.timeline if r[0] == resource and r[4] >= warm)
        assert out.summary["utilization"][resource] == pytest.approx(busy / window, rel=1e-9)
