"""Regression tests for defects found reviewing the CPU expert model (moesim.perf.cpu), the CPU
spec and the memory tiers (moesim.hardware.tiers)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from moesim.config.loader import load_scenario
from moesim.errors import InputError
from moesim.hardware.spec import CpuSpec
from moesim.models.presets import load_model_preset
from moesim.models.spec import ModelSpec
from moesim.perf.cpu import CpuExpertModel
from tests.conftest import ROOT

MIXTRAL = ModelSpec.model_validate(load_model_preset("mixtral-8x7b"))
XEON = {  # round numbers for hand checks (not a preset)
    "name": "test-xeon-1s", "sockets": 1, "cores_per_socket": 32, "dram_bandwidth_gb_s": 200.0,
    "peak_gflops_fp32": 4096.0, "peak_gflops_bf16": 65536.0, "compute_efficiency": 0.5,
    "units": {"avx512": {"fp32": 128.0, "bf16": 256.0}, "amx": {"bf16": 2048.0}},
}


def cpu(**kw) -> CpuSpec:
    d = copy.deepcopy(XEON)
    d.update(kw)
    return CpuSpec.model_validate(d)


def test_unit_is_honoured_with_all_cores_on_one_expert():
    # threads_per_expert unset (all cores on one expert) with an explicit unit: the expert's FLOPs
    # run at cores x the unit's per-core peak, not at the aggregate-model times (which ignored the
    # unit: avx512 and amx gave the same time even where the arithmetic bounds it)
    spec = cpu()
    n = 2048  # a prefill-sized chunk: compute-bound
    legacy = np.full(n + 1, 1e-3)  # aggregate-model times; must not be used once a unit is named
    t = {}
    for unit in ("avx512", "amx"):
        m = CpuExpertModel(MIXTRAL, spec, threads=None, unit=unit, legacy_times=legacy)
        w = m.workers[0]
        t[unit] = m.alone(n, w, w.nodes[0])[0]
        flops = MIXTRAL.expert_flops(1) * n
        peak = {"avx512": 256.0, "amx": 2048.0}[unit] * 1e9 * 32 * 0.5
        assert t[unit] == pytest.approx(max(flops / peak, MIXTRAL.expert_bytes / 200e9), rel=1e-12)
    assert t["amx"] < t["avx512"]
    # unit auto keeps the aggregate model's own times
    m = CpuExpertModel(MIXTRAL, spec, threads=None, unit="auto", legacy_times=legacy)
    assert m.alone(n, m.workers[0], 0)[0] == pytest.approx(max(1e-3, MIXTRAL.expert_bytes / 200e9), rel=1e-12)


def test_more_numa_nodes_than_cores_is_refused():
    # a node with no core of its own would get a worker anyway (more workers than cores) and the
    # aggregate worker zero threads on it
    with pytest.raises(ValueError, match="numa_nodes_per_socket"):
        cpu(cores_per_socket=2, numa_nodes_per_socket=4)
    assert cpu(cores_per_socket=4, numa_nodes_per_socket=4).cores_per_node == 1


def test_pinned_capacity_above_host_memory_is_refused():
    from moesim.engine.build import prepare

    sc = ROOT / "scenarios" / "mixtral-8x7b-rtx4090-tiers-pinned16-dram64.yaml"
    with pytest.raises(InputError, match=r"pinned_capacity_gib.*80.*more than.*64"):
        prepare(load_scenario(sc, ["workload.max_tokens=64", "workload.warmup_tokens=4", "hardware.host_memory.pinned_capacity_gib=80"]))
