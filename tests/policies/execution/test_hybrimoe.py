"""HybriMoE's per-layer split: never estimated slower than all-CPU or all-GPU-on-demand."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.policies.execution.hybrimoe import plan_layer
from tests.conftest import ROOT

times = st.lists(st.floats(1e-6, 1e-2), min_size=9, max_size=9)


@settings(max_examples=300, deadline=None)
@given(hits=st.lists(st.integers(1, 8), max_size=6), misses=st.lists(st.integers(1, 8), min_size=1, max_size=8),
       gpu=times, cpu=times, copy_s=st.floats(1e-5, 5e-2), act=st.floats(0, 1e-3))
def test_split_never_worse_than_pure_plans(hits, misses, gpu, cpu, copy_s, act):
    gpu_t, cpu_t = [0.0, *gpu[1:]], [0.0, *cpu[1:]]
    cpu_idx, est = plan_layer(hits, misses, gpu_t, cpu_t, copy_s, act)
    _, all_gpu = plan_layer(hits, misses, gpu_t, [1e9] * 9, copy_s, act)  # CPU unusable: pure GPU
    _, all_cpu = plan_layer(hits, misses, gpu_t, cpu_t, 1e9, act)  # link unusable: pure CPU
    assert est <= all_gpu + 1e-12
    assert est <= all_cpu + 1e-12
    assert cpu_idx <= set(range(len(misses)))


def test_split_follows_the_link_speed():
    gpu_t = [0.0] + [1e-4] * 8
    cpu_t = [0.0] + [1e-2 * n for n in range(1, 9)]
    fast, _ = plan_layer([], [1, 1, 4, 8], gpu_t, cpu_t, 1e-3)
    slow, _ = plan_layer([], [1, 1, 4, 8], gpu_t, cpu_t, 1.0)
    assert fast == set()  # a fast link loads everything
    assert slow == {0, 1, 2, 3}  # a useless link: all on the CPU
    mid, _ = plan_layer([], [1, 1, 4, 8], gpu_t, cpu_t, 0.02)
    assert 3 not in mid and mid  # the heaviest expert crosses the link, light ones stay on the CPU


@pytest.mark.parametrize("bw", [8.0, 54.89])
def test_hybrimoe_beats_both_pure_strategies_end_to_end(bw):
    sets = ["workload.max_tokens=32", "workload.warmup_tokens=4", "workload.batch_size=4",
            f"hardware.link.h2d_bandwidth_gb_s={bw}"]
    sc = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml"
    t = {x: simulate(load_scenario(sc, [*sets, f"policies.execution.kind={x}"])).summary["tpot_ms"]["mean"]
         for x in ("hybrimoe", "fiddler", "gpu_only")}
    assert t["hybrimoe"] <= min(t["fiddler"], t["gpu_only"])
