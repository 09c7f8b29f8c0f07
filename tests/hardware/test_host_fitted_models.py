"""The host models fitted to the H100 calibration data (issue 6): the per-op host cost of an eager
framework call (``hardware.host.eager_op_us``) as the engine's launch cost, and the CPU expert
model's weight passes, per-call overhead and non-overlapped arithmetic
(``hardware.cpu.weight_passes`` / ``call_overhead_us`` / ``overlap_compute_and_memory``). Defaults
keep the old models exactly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.hardware.presets import load_hardware_preset
from moesim.hardware.spec import CpuSpec, HardwareSpec
from moesim.models.presets import load_model_preset
from moesim.models.spec import ModelSpec
from moesim.perf.cpu import CpuExpertModel
from moesim.perf.predictor import Predictor
from tests.conftest import ROOT

SC = ROOT / "scenarios"
SHORT = ["workload.max_tokens=24", "workload.warmup_tokens=4"]
KEYS = ("tpot_ms", "cache", "transfers", "critical_path_ms", "utilization")


def run(name, *sets):
    return simulate(load_scenario(SC / name, [*SHORT, *sets])).summary


# ----- eager per-op host cost -----------------------------------------------------------------------
def test_engine_charges_eager_op_us_per_eager_launch():
    # eager_op_us = X runs exactly like the old model with launch_us = X
    a = run("mixtral-8x7b-h100-resident-fp8.yaml", "hardware.host.eager_op_us=30.0")
    b = run("mixtral-8x7b-h100-resident-fp8.yaml", "hardware.host.eager_op_us=null", "hardware.host.launch_us=30.0")
    for k in KEYS:
        assert a[k] == b[k], k
    # and without it the bare enqueue cost is what the engine charges (the old behaviour)
    c = run("mixtral-8x7b-h100-resident-fp8.yaml", "hardware.host.eager_op_us=null")
    d = run("mixtral-8x7b-h100-resident-fp8.yaml", "hardware.host.eager_op_us=11.74")
    assert c["tpot_ms"] == d["tpot_ms"]


def test_fitted_eager_op_cost_slows_launch_bound_resident_decode():
    fitted = run("mixtral-8x7b-h100-resident-fp8.yaml")
    bare = run("mixtral-8x7b-h100-resident-fp8.yaml", "hardware.host.eager_op_us=null")
    assert fitted["tpot_ms"]["mean"] > bare["tpot_ms"]["mean"]
    assert fitted["critical_path_ms"]["host"] > bare["critical_path_ms"]["host"]


def test_graph_launches_do_not_use_the_eager_op_cost():
    a = run("mixtral-8x7b-h100-resident-fp8.yaml", "runtime.launch_mode=graph")
    b = run("mixtral-8x7b-h100-resident-fp8.yaml", "runtime.launch_mode=graph", "hardware.host.eager_op_us=null")
    for k in KEYS:
        assert a[k] == b[k], k


def test_host_op_launch_falls_back_to_launch_us():
    raw = copy.deepcopy(load_hardware_preset("h100-sxm-pcie5"))
    assert HardwareSpec.model_validate(raw).host.op_launch_us == raw["host"]["eager_op_us"]
    del raw["host"]["eager_op_us"]
    assert HardwareSpec.model_validate(raw).host.op_launch_us == raw["host"]["launch_us"]


# ----- CPU expert model -----------------------------------------------------------------------------
def _hw(**cpu_kw) -> HardwareSpec:
    raw = copy.deepcopy(load_hardware_preset("h100-sxm-pcie5"))
    raw["cpu_expert_profile"] = None  # the model, not the measured table
    for k in ("call_overhead_us", "weight_passes", "overlap_compute_and_memory"):
        raw["cpu"].pop(k, None)
    raw["cpu"].update(cpu_kw)
    return HardwareSpec.model_validate(raw)


def _model(dtype: str) -> ModelSpec:
    return ModelSpec.model_validate(dict(load_model_preset("mixtral-8x7b"), dtype=dtype))


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(["fp32", "bf16"]), tokens=st.lists(st.integers(0, 512), min_size=1, max_size=6))
def test_default_cpu_fields_keep_the_plain_roofline(dtype, tokens):
    hw, m = _hw(), _model(dtype)
    cpu = hw.cpu
    tok = np.array(tokens, dtype=float)
    peak = cpu.peak_gflops_bf16 if dtype == "bf16" else cpu.peak_gflops_fp32
    want = np.where(tok > 0, np.maximum(m.expert_flops(1) * tok / (peak * 1e9 * cpu.compute_efficiency),
                                        m.expert_bytes / (cpu.dram_bandwidth_gb_s * 1e9)), 0.0)
    got = Predictor(m, hw).cpu_expert_times(tokens)
    assert np.array_equal(got, want)


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(["fp32", "bf16"]), n=st.integers(1, 256),
       passes=st.floats(1.0, 4.0), c0=st.floats(0.0, 500.0), overlap=st.booleans())
def test_cpu_model_terms(dtype, n, passes, c0, overlap):
    hw = _hw(weight_passes={dtype: passes}, call_overhead_us=c0, overlap_compute_and_memory=overlap)
    m = _model(dtype)
    cpu = hw.cpu
    peak = cpu.peak_gflops_bf16 if dtype == "bf16" else cpu.peak_gflops_fp32
    tf = m.expert_flops(1) * n / (peak * 1e9 * cpu.compute_efficiency)
    tb = passes * m.expert_bytes / (cpu.dram_bandwidth_gb_s * 1e9)
    want = (max(tf, tb) if overlap else tf + tb) + c0 * 1e-6
    agg = float(Predictor(m, hw).cpu_expert_times([n])[0])
    assert agg == pytest.approx(want, rel=1e-12)
    # the thread model with one 16-thread worker on the one node gives the same alone-time
    threads = CpuExpertModel(m, cpu, threads=cpu.cores)
    w = threads.workers[0]
    assert threads.alone(n, w, w.nodes[0])[0] == pytest.approx(want, rel=1e-9)
    # and its DRAM demand is the passes times the weights
    assert sum(threads.alone(n, w, w.nodes[0])[1].values()) == pytest.approx(passes * m.expert_bytes)


def test_fitted_host_bf16_is_flat_in_tokens_and_fp32_grows():
    # the measured host: bf16 experts cost about the same from 1 to 32 tokens, fp32 ones grow
    hw = HardwareSpec.model_validate(dict(load_hardware_preset("h100-sxm-pcie5"), cpu_expert_profile=None))
    bf = Predictor(_model("bf16"), hw).cpu_expert_times([1, 32])
    fp = Predictor(_model("fp32"), hw).cpu_expert_times([1, 32])
    assert bf[1] / bf[0] < 1.2 and fp[1] / fp[0] > 2.5
    assert bf[0] > fp[0]  # bf16 slower than fp32 at one token on this host, as measured


def test_weight_passes_are_checked():
    base = dict(load_hardware_preset("h100-sxm-pcie5")["cpu"])
    with pytest.raises(ValueError, match="weight_passes"):
        CpuSpec.model_validate(dict(base, weight_passes={"bf17": 2.0}))
    with pytest.raises(ValueError, match=">= 1"):
        CpuSpec.model_validate(dict(base, weight_passes={"bf16": 0.5}))
