"""Regression tests for defects found reviewing the precision policies' engine wiring."""

from __future__ import annotations

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "mixtral-8x7b-rtx4090-d2moe-c64.yaml"


def test_streamed_low_precision_misses_are_low_precision_loads():
    # a 2-slot global pool holds four mwq4 copies; batch 8 needs more distinct experts a layer, so
    # some misses stream through the transient buffer, still at mwq4. Every miss asks for exactly
    # mwq4 (thresholds [0, 1]: depth 2 for any weight below 1), so nothing is topped up and every
    # expert copy is a low-precision load, streamed ones included
    s = simulate(load_scenario(SC, [
        "workload.max_tokens=48", "workload.warmup_tokens=8", "workload.batch_size=8",
        "policies.cache.capacity_experts=2", "policies.precision.thresholds=[0.0, 1.0]",
        "policies.precision.layer_budget_mib=null",
    ])).summary
    p = s["precision"]
    assert s["cache"]["streamed"] > 0 and p["topups"] == 0
    assert p["by_format"]["mwq4"]["loads"] == s["transfers"]["copies"]
    assert p["low_precision_loads"] == s["transfers"]["copies"] == s["cache"]["misses"]
