"""A two-layer, three-token example computed by hand (see the derivation in the comments), matched
against the engine's timeline to the microsecond."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.config.schema import RuntimeConfig
from moesim.engine.plan import build_plan
from moesim.engine.single_gpu import CP_KEYS, SingleGpuEngine, StageTimes
from moesim.hardware.spec import HardwareSpec
from moesim.policies.cache.base import CacheSetup
from moesim.policies.cache.lru import Lru

US = 1e-6


def _engine(tiny_hw):
    hw = HardwareSpec.model_validate(tiny_hw)  # launch 1 us, copy issue 2 us, readback 5 us
    # token t: [expert at layer 0, expert at layer 1]
    experts = np.array([[[0], [1]], [[0], [2]], [[1], [2]]], dtype=np.int16)
    plan = build_plan(experts, batch_size=1, max_tokens=3, loop_trace=False)
    stage = StageTimes(
        dense_base=[10 * US, 10 * US],
        dense_blocks=[1, 1],
        dense_membound=[True, True],
        attn=[0.0, 0.0, 0.0],
        tail_base=10 * US,
        tail_blocks=0,
        tail_membound=True,
        expert=[0.0, 20 * US],
        expert_membound=[True, True],
    )
    setup = CacheSetup(num_columns=2, num_experts=4, expert_bytes=1000, top_k=1, model_layers=(0, 1), max_distinct_per_step=1)
    cache = Lru(Lru.Config(capacity_experts=2), setup)
    rt = RuntimeConfig(dense_kernels_per_layer=1, kernels_per_expert=1, head_kernels=1)
    eng = SingleGpuEngine(
        plan=plan, col_src=[0, 1], model_layers=[0, 1], cache=cache, stage=stage, hw=hw,
        runtime=rt, expert_bytes=1000, copy_s=50 * US, warmup_steps=0, record_timeline=True,
    )
    return eng


def _rows(res, resource):
    return [
        (kind, round(a / US, 6), round(b / US, 6), step, layer, expert)
        for (r, kind, a, b, step, layer, expert, _) in res.timeline
        if r == resource
    ]


def test_compute_stream_matches_hand_derivation(tiny_hw):
    res = _engine(tiny_hw).run()
    # step 0: dense L0 launched at 0 (+1 us launch) ; router read at 11+5=16 ; copy issued 16+2=18
    # runs 18..68 ; expert waits for it 68..88 ; L1 dense 88..98 ; router 103 ; copy 105..155 ;
    # expert 155..175 ; head 175..185 ; token read back 190.
    # step 1: L0 hit (e0) ; L1 miss e2 evicts e1 (LRU; slot free since 175) ; copy 244..294.
    # step 2: L0 miss e1 evicts e0 (least recent) ; copy 347..397 ; L1 hit e2.
    assert _rows(res, "gpu0.compute") == [
        ("dense", 1, 11, 0, 0, -1),
        ("expert_loaded", 68, 88, 0, 0, 0),
        ("dense", 88, 98, 0, 1, -1),
        ("expert_loaded", 155, 175, 0, 1, 1),
        ("head", 175, 185, 0, -1, -1),
        ("dense", 191, 201, 1, 0, -1),
        ("expert_hit", 207, 227, 1, 0, 0),
        ("dense", 227, 237, 1, 1, -1),
        ("expert_loaded", 294, 314, 1, 1, 2),
        ("head", 314, 324, 1, -1, -1),
        ("dense", 330, 340, 2, 0, -1),
        ("expert_loaded", 397, 417, 2, 0, 1),
        ("dense", 417, 427, 2, 1, -1),
        ("expert_hit", 433, 453, 2, 1, 2),
        ("head", 453, 463, 2, -1, -1),
    ]
    assert _rows(res, "gpu0.h2d") == [
        ("copy", 18, 68, 0, 0, 0),
        ("copy", 105, 155, 0, 1, 1),
        ("copy", 244, 294, 1, 1, 2),
        ("copy", 347, 397, 2, 0, 1),
    ]
    assert np.allclose(res.step_end_s / US, [190, 329, 468])


def test_counters_and_critical_path(tiny_hw):
    res = _engine(tiny_hw).run()
    c = res.counters
    assert (c["accesses"], c["hits"], c["misses"], c["evictions"], c["copies"]) == (6, 2, 4, 2, 4)
    assert c["bytes_h2d"] == 4 * 1000
    parts = dict(zip(CP_KEYS, res.step_parts_s.T / US))
    # step 0: GPU 70, copy wait 57+57, host 1 (first launch) + 5 (token read-back)
    assert parts["gpu_compute"] == pytest.approx([70, 70, 70])
    assert parts["copy_wait"] == pytest.approx([114, 57, 57])
    assert parts["host"] == pytest.approx([6, 12, 12])
    assert parts["idle"] == pytest.approx([0, 0, 0])
    totals = res.step_parts_s.sum(axis=1)
    assert totals / US == pytest.approx([190, 139, 139])
    assert res.events == 2 * 3 + 3  # one router wait per (step, layer), one token wait per step
