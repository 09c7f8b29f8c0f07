"""Runtime settings change the answer in the directions real systems show."""

from __future__ import annotations

import pytest

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from tests.conftest import ROOT

SC = ROOT / "scenarios"
SHORT = ["workload.max_tokens=48", "workload.warmup_tokens=4"]


def tpot(name, *sets):
    return simulate(load_scenario(SC / name, [*SHORT, *sets])).summary["tpot_ms"]["mean"]


def test_launch_modes_for_small_launch_bound_experts():
    # OLMoE's experts are ~20 us of GPU time, far below 5 eager launches of ~12 us each
    base = ("olmoe-1b-7b-rtx4090-lru-c512.yaml", "policies.cache.kind=all_resident", "workload.batch_size=1")
    eager = tpot(*base, "runtime.launch_mode=eager")
    graph = tpot(*base, "runtime.launch_mode=graph")
    fused = tpot(*base, "runtime.launch_mode=fused")
    assert eager > graph > fused
    assert eager > 2 * fused  # several-fold for small experts


def test_device_side_routing_skips_the_router_wait():
    base = ("mixtral-8x7b-h100-resident-fp8.yaml", "runtime.launch_mode=fused")
    with_wait = tpot(*base)
    no_wait = tpot(*base, "runtime.wait_for_router=false")
    assert no_wait < with_wait


def test_device_side_routing_needs_resident_experts():
    sc = load_scenario(SC / "mixtral-8x7b-h100-lru-c96.yaml", [*SHORT, "runtime.wait_for_router=false", "runtime.launch_mode=fused"])
    with pytest.raises(InputError, match="all_resident"):
        simulate(sc)


def test_pageable_copies_are_slower_and_block_the_host():
    pinned = simulate(load_scenario(SC / "mixtral-8x7b-h100-lru-c96.yaml", SHORT)).summary
    pageable = simulate(load_scenario(SC / "mixtral-8x7b-h100-lru-c96.yaml", [*SHORT, "runtime.host_memory=pageable"])).summary
    assert pageable["tpot_ms"]["mean"] > 3 * pinned["tpot_ms"]["mean"]
    assert pageable["utilization"]["host0"] > pinned["utilization"]["host0"]
    assert pageable["cache"] == pinned["cache"]  # timing does not change the policy's decisions


def test_copy_interference_stretches_overlapped_kernels():
    sets = [*SHORT, "hardware.gpu.copy_interference.memory_bound_slowdown=1.25"]
    out = simulate(load_scenario(SC / "mixtral-8x7b-h100-lru-c96.yaml", sets), record_timeline=True)
    tl = out.result.timeline
    nominal = out.prepared.engine.stage.expert[1]
    copies = [(r[2], r[3]) for r in tl if r[0] == "gpu0.h2d"]
    kernels = [r for r in tl if r[0] == "gpu0.compute" and r[1].startswith("expert")]
    inside = outside = 0
    for r in kernels:
        dur = r[3] - r[2]
        cover = sum(max(0.0, min(r[3], ce) - max(r[2], cs)) for cs, ce in copies)
        if cover >= dur * (1 - 1e-9):  # wholly under copies: runs 1.25x slower
            assert dur == pytest.approx(1.25 * nominal, rel=1e-9)
            inside += 1
        elif cover == 0.0:
            assert dur == pytest.approx(nominal, rel=1e-9)
            outside += 1
        else:  # partly: between the two
            assert nominal < dur < 1.25 * nominal
    assert inside > 0 and outside > 0


def test_trace_of_another_model_is_flagged():
    sc = load_scenario(SC / "mixtral-8x7b-h100-lru-c96.yaml", [*SHORT, f"trace.path={ROOT / 'traces' / 'switch-base-8.npz'}"])
    s = simulate(sc).summary
    note = s["routing_note"]
    assert "WARNING" in note and "switch-base-8" in note
    assert "no trace column" in note  # 32 MoE layers, 6 traced
    assert "experts per token" in note  # top-1 trace on a top-2 model


def test_short_trace_stops_and_says_so():
    sc = load_scenario(SC / "switch-base-8-rtx4090-lru-c16.yaml", ["workload.max_tokens=1000"])
    s = simulate(sc).summary
    assert s["decode_steps"] + s["warmup_steps"] == 215
    assert "run stops at its end" in s["routing_note"]
    sc = load_scenario(SC / "switch-base-8-rtx4090-lru-c16.yaml", ["workload.max_tokens=1000", "workload.loop_trace=true"])
    assert simulate(sc).summary["decode_steps"] + 8 == 1000
