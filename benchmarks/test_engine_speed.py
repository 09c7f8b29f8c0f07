"""Simulator speed: simulated layer-steps per wall-second for a Mixtral-8x7B offload scenario of
2,048 decode tokens, with the exact SimPy event count asserted (one router wait per (step, MoE
layer) and one token wait per step), so that a speed change is visible and explainable.

Run: ``pytest benchmarks`` (``--benchmark-disable`` runs each once, as CI does).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 2048


@pytest.mark.parametrize("scenario", ["mixtral-8x7b-h100-lru-c96.yaml", "mixtral-8x7b-h100-streaming.yaml"])
def test_offload_layer_steps_per_second(benchmark, scenario):
    sc = load_scenario(
        ROOT / "scenarios" / scenario,
        [f"workload.max_tokens={TOKENS}", "workload.warmup_tokens=0", "workload.loop_trace=true"],
    )
    out = benchmark(simulate, sc)
    s = out.summary
    layers = len(sc.model.moe_layers)
    assert s["decode_steps"] == TOKENS
    assert s["layer_steps"] == TOKENS * layers
    assert s["events_processed"] == TOKENS * (layers + 1)
    rate = s["layer_steps"] / s["wall_time_s"]
    benchmark.extra_info["layer_steps_per_s"] = rate
    print(f"\n{scenario}: {rate:,.0f} layer-steps/s ({s['wall_time_s']:.3f} s wall)")
