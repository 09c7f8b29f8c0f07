"""Streamed dense weights (ZeRO-Inference style): copied one stage ahead into a double buffer."""

from __future__ import annotations

import pytest

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from tests.conftest import ROOT

SC = ROOT / "scenarios"


def test_streamed_dense_weights_cost_copies_and_fit_in_less_memory():
    short = ["workload.max_tokens=24", "workload.warmup_tokens=2"]
    res = simulate(load_scenario(SC / "mixtral-8x7b-h100-streaming.yaml", short)).summary
    out = simulate(load_scenario(SC / "mixtral-8x7b-h100-zero-inference.yaml", short), record_timeline=True)
    zs = out.summary
    t = zs["transfers"]
    m = out.prepared.scenario.model
    layers = len(m.moe_layers)
    assert t["dense_copies"] == zs["decode_steps"] * layers
    per_step = sum(m.block_dense_params(b) for b in range(m.num_layers)) * m.bytes_per_param
    assert t["bytes_h2d_dense"] == pytest.approx(zs["decode_steps"] * per_step, rel=1e-9)
    assert t["bytes_h2d"] == t["bytes_h2d_dense"] + t["bytes_h2d_experts"]
    assert t["bytes_h2d_experts"] == t["copies"] * t["expert_bytes"]
    assert zs["tpot_ms"]["mean"] > res["tpot_ms"]["mean"]
    assert zs["memory"]["dense_bytes"] < res["memory"]["dense_bytes"]
    # each stage's dense op starts only after its weights landed
    tl = out.result.timeline
    lands = {(r[4], r[5]): r[3] for r in tl if r[1] == "copy_dense"}
    dense = [r for r in tl if r[1] == "dense"]
    for r in dense:
        key = (r[4], r[5])
        if key in lands:
            assert r[2] >= lands[key]
    # double buffer: stage c's weights are copied only after stage c-2 (same buffer) has run
    ends = {(r[4], r[5]): r[3] for r in dense}
    layers_ = out.prepared.model_layers
    for r in tl:
        if r[1] != "copy_dense":
            continue
        c = layers_.index(r[5])
        back = (r[4], layers_[c - 2]) if c >= 2 else (r[4] - 1, layers_[c - 2])
        if back in ends:
            assert r[2] >= ends[back]
    cp = zs["critical_path_ms"]
    assert sum(cp[k] for k in ("gpu_compute", "copy_wait", "host", "cpu_expert", "comm", "idle")) == pytest.approx(cp["total"], rel=1e-9)
