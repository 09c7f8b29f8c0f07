"""llama.cpp --n-cpu-moe: the first N MoE layers' experts run on the CPU, the rest on the GPU."""

from __future__ import annotations

import pytest

from moesim.config.loader import load_scenario
from moesim.errors import InputError
from moesim.engine.run import simulate
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "mixtral-8x7b-rtx4090-llamacpp-ncpumoe24.yaml"


def run(n):
    return simulate(load_scenario(SC, ["workload.max_tokens=24", "workload.warmup_tokens=0", f"policies.cache.cpu_moe_layers={n}"])).summary


def test_n_cpu_moe_layout_and_cost():
    prev = None
    for n in (24, 26, 28, 32):
        s = run(n)
        c = s["cache"]
        assert c["cpu_executed"] == c["accesses"] * n // 32  # top-2 of 8 at every layer
        assert c["hits"] == c["accesses"] - c["cpu_executed"]
        assert s["transfers"]["copies"] == 0
        per = s["per_layer"]
        assert all(p["cpu_executed"] == p["accesses"] for p in per[:n])
        assert all(p["cpu_executed"] == 0 for p in per[n:])
        assert s["memory"]["expert_cache_bytes"] == (32 - n) * 8 * s["transfers"]["expert_bytes"]
        if prev is not None:
            assert s["tpot_ms"]["mean"] > prev  # the CPU is the slower place for an expert
        prev = s["tpot_ms"]["mean"]


def test_too_few_cpu_layers_do_not_fit_a_24gb_gpu():
    with pytest.raises(InputError, match="does not fit in GPU memory"):
        run(16)
