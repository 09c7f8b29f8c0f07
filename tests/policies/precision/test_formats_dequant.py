"""Formats users run (HQQ 2/3-bit, ternary TQ2_0/TQ1_0): bytes with scales, dequantisation cost."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.hardware.presets import load_hardware_preset
from moesim.hardware.spec import DTYPES, HardwareSpec
from moesim.models.presets import load_model_preset
from moesim.models.spec import BYTES_PER_PARAM, ModelSpec
from moesim.perf.dequant import DEQUANT_OPS_PER_WEIGHT, is_native
from moesim.perf.predictor import Predictor
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml"
NEW = {"hqq2": 2.5, "hqq3": 3.7, "tq2_0": 2.0625, "tq1_0": 1.6875}


def model(fmt):
    return ModelSpec.model_validate({**load_model_preset("mixtral-8x7b"), "expert_dtype": fmt})


def hw(name="h100-sxm-pcie5"):
    return HardwareSpec.model_validate(load_hardware_preset(name))


def test_new_formats_bits_per_weight_include_scales():
    params = 3 * 4096 * 14336
    for fmt, bpw in NEW.items():
        # HQQ: group 64 with fp16 scale + fp16 zero = 0.5 bits; 3-bit packs 10 per int32 = 3.2 bits
        assert model(fmt).expert_bytes == round(params * bpw / 8)
    assert BYTES_PER_PARAM["hqq3"] * 8 == pytest.approx(32 / 10 + 32 / 64)
    assert BYTES_PER_PARAM["tq2_0"] * 8 == pytest.approx((256 * 2 + 16) / 256)
    assert BYTES_PER_PARAM["tq1_0"] * 8 == pytest.approx(54 * 8 / 256)
    assert set(BYTES_PER_PARAM) == set(DTYPES)
    assert set(DEQUANT_OPS_PER_WEIGHT) - {"mwq"} <= set(DTYPES)


@pytest.mark.parametrize("fmt", sorted(BYTES_PER_PARAM))
def test_free_mode_is_the_plain_roofline_and_native_formats_cost_nothing(fmt):
    m, h = model(fmt), hw()
    tok = np.arange(0, 65)
    free = Predictor(m, h).expert_times(tok)[0]
    for mode in ("fused", "separate"):
        t = Predictor(m, h, mode).expert_times(tok)[0]
        if is_native(fmt, h.gpu.peak_tflops):
            assert np.array_equal(t, free)
        else:
            assert (t[1:] >= free[1:] - 1e-15).all()
            assert t[0] == 0.0


@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from([f for f in BYTES_PER_PARAM if f not in ("fp32", "bf16", "fp16", "fp8", "int8")]),
       tokens=st.integers(1, 256), gpu=st.sampled_from(["h100-sxm-pcie5", "rtx4090-pcie4", "t4-pcie3"]))
def test_dequant_cost_by_hand(fmt, tokens, gpu):
    """fused = max(FLOPs, bytes, unpacking) + fixed; separate = pass (packed read + 16-bit write,
    or unpacking if slower) + fixed + a bf16 GEMM over 2-byte weights."""
    m, h = model(fmt), hw(gpu)
    g = h.gpu
    if is_native(fmt, g.peak_tflops):
        return
    P = m.expert_params
    mem = g.hbm_bandwidth_gb_s * 1e9 * g.memory_efficiency
    fixed = g.kernel_fixed_us * 1e-6
    act = tokens * (2 * m.hidden_size + 3 * m.moe_intermediate_size) * m.bytes_per_param
    flops = 2.0 * P * tokens
    alu = P * DEQUANT_OPS_PER_WEIGHT[fmt] / (g.peak_tflops.fp32 * 1e12 * g.compute_efficiency)
    peak = g.peak_tflops.for_dtype(fmt) * 1e12 * g.compute_efficiency
    fused = max(flops / peak, (P * BYTES_PER_PARAM[fmt] + act) / mem, alu) + 5 * fixed
    assert Predictor(m, h, "fused").expert_times([tokens])[0][0] == pytest.approx(fused, rel=1e-9)
    bf16 = g.peak_tflops.bf16 * 1e12 * g.compute_efficiency
    sep = max(alu, P * (BYTES_PER_PARAM[fmt] + 2) / mem) + fixed + max(flops / bf16, (2 * P + act) / mem) + 5 * fixed
    assert Predictor(m, h, "separate").expert_times([tokens])[0][0] == pytest.approx(sep, rel=1e-9)


def test_dequant_reaches_the_run_and_is_reported():
    base = ["workload.max_tokens=48", "workload.warmup_tokens=4", "model.expert_dtype=hqq2"]
    free = simulate(load_scenario(SC, base)).summary
    sep = simulate(load_scenario(SC, [*base, "runtime.dequant=separate"])).summary
    assert sep["precision"]["dequant"] == "separate"
    assert sep["cache"] == free["cache"] and sep["transfers"] == free["transfers"]
    f, s = free["precision"]["by_format"]["hqq2"], sep["precision"]["by_format"]["hqq2"]
    assert s["expert_gpu_s"] > 2 * f["expert_gpu_s"]  # an extra pass + a 16-bit GEMM
    assert sep["tpot_ms"]["mean"] > free["tpot_ms"]["mean"]
    assert f["loads"] == free["transfers"]["copies"] and f["bytes_h2d"] == free["transfers"]["bytes_h2d_experts"]


def test_ops_override_and_bad_input():
    m, h = model("hqq2"), hw("t4-pcie3")
    slow = Predictor(m, h, "fused", {"hqq2": 400.0}).expert_times([1])[0][0]
    assert slow > Predictor(m, h, "fused").expert_times([1])[0][0]
    with pytest.raises(InputError, match="dequant_ops_per_weight"):
        load_scenario(SC, ["runtime.dequant_ops_per_weight={hqq5: 3}"])
    with pytest.raises(InputError, match="runtime.dequant"):
        load_scenario(SC, ["runtime.dequant=lazy"])
