"""Execution-time predictor: measured tables where they exist, roofline otherwise."""

from __future__ import annotations


import numpy as np
import pytest

from moesim.hardware.presets import load_hardware_preset
from moesim.hardware.spec import HardwareSpec
from moesim.models.presets import load_model_preset
from moesim.models.spec import ModelSpec
from moesim.perf.predictor import Predictor, load_profile_table


def _p(model, hw, **over):
    m = ModelSpec.model_validate({**load_model_preset(model), **over})
    return Predictor(m, HardwareSpec.model_validate(load_hardware_preset(hw)))


def test_mixtral_on_h100_uses_the_measured_table_exactly_at_measured_points():
    p = _p("mixtral-8x7b", "h100-sxm-pcie5")
    assert p.expert_source.startswith("profile table")
    rows = [r for r in load_profile_table("h100-sxm-bf16")["rows"] if r["shape"] == "mixtral"]
    toks = np.array([r["tokens"] for r in rows])
    t, _ = p.expert_times(toks)
    assert t * 1e6 == pytest.approx([r["graph_us"] for r in rows], rel=1e-12)
    # between measured counts: linear interpolation, and monotone overall
    t3, _ = p.expert_times([2, 3, 4])
    assert t3[0] <= t3[1] <= t3[2] or abs(t3[0] - t3[2]) / t3[0] < 0.05
    assert p.expert_times([0])[0][0] == 0.0


def test_roofline_when_no_table_matches():
    p = _p("mixtral-8x7b", "h100-sxm-pcie5", expert_dtype="fp8")  # table is bf16 only
    assert p.expert_source == "roofline"
    hw = p.hw.gpu
    t, mb = p.expert_times([1, 4096], kernels=5)
    m = p.model
    bytes_1 = m.expert_bytes + (2 * m.hidden_size + 3 * m.moe_intermediate_size) * m.bytes_per_param
    assert t[0] == pytest.approx(bytes_1 / (hw.hbm_bandwidth_gb_s * 1e9 * hw.memory_efficiency) + 5 * hw.kernel_fixed_us * 1e-6)
    assert mb[0] and not mb[1]  # one token is memory-bound, 4096 tokens compute-bound
    flops = m.expert_flops(4096)
    assert t[1] == pytest.approx(flops / (hw.peak_tflops.fp8 * 1e12 * hw.compute_efficiency) + 5 * hw.kernel_fixed_us * 1e-6)


def test_table_and_roofline_agree_roughly_for_memory_bound_mixtral():
    # the roofline with the fitted efficiencies should land near the measurement at 1 token
    p_tab = _p("mixtral-8x7b", "h100-sxm-pcie5")
    hw = HardwareSpec.model_validate({**load_hardware_preset("h100-sxm-pcie5"), "expert_profile": None})
    p_roof = Predictor(p_tab.model, hw)
    a = p_tab.expert_times([1])[0][0]
    b = p_roof.expert_times([1])[0][0]
    assert b == pytest.approx(a, rel=0.05)


def test_attention_grows_with_context():
    p = _p("mixtral-8x7b", "h100-sxm-pcie5")
    t, _ = p.attention_core(8, np.array([0, 1024, 4096]))
    assert t[0] == 0 and t[1] < t[2]
    assert t[2] == pytest.approx(4 * t[1])
