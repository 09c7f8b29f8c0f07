"""MoTE-style ternary routed experts: every load moves exactly one ternary expert's bytes."""

from __future__ import annotations

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "qwen1.5-moe-a2.7b-rtx4090-mote-ternary.yaml"
SHORT = ["workload.max_tokens=96", "workload.warmup_tokens=8"]


def test_bytes_moved_equal_loads_times_ternary_expert_bytes():
    out = simulate(load_scenario(SC, SHORT), record_timeline=True)
    s, m = out.summary, out.prepared.scenario.model
    t = s["transfers"]
    tern = round(m.expert_params * 2.0625 / 8)  # TQ2_0: 2 bits + an fp16 scale per 256 weights
    assert m.expert_dtype == "tq2_0" and t["expert_bytes"] == tern
    assert t["copies"] == s["cache"]["misses"] > 0
    assert t["bytes_h2d_experts"] == t["copies"] * tern
    assert s["precision"]["by_format"] == {"tq2_0": {**s["precision"]["by_format"]["tq2_0"]}}
    assert all(r[7] == tern for r in out.result.timeline if r[0] == "gpu0.h2d")
    # the shared expert stays in bf16 and resident: dense bytes carry it at 2 bytes per weight
    assert m.dense_bytes > m.num_layers * m.shared_expert_params * 2


def test_ternary_moves_fewer_bytes_than_bf16_with_the_same_hits():
    tern = simulate(load_scenario(SC, SHORT)).summary
    bf16 = simulate(load_scenario(SC, [*SHORT, "model.expert_dtype=bf16"])).summary
    assert tern["cache"] == bf16["cache"]  # the same slots and routing: the same hits
    ratio = tern["transfers"]["bytes_h2d"] / bf16["transfers"]["bytes_h2d"]
    assert abs(ratio - 2.0625 / 16) < 1e-6
    assert tern["tpot_ms"]["mean"] < bf16["tpot_ms"]["mean"]
