"""Experts whose home copy is on flash: every load is a flash read, then the link copy."""

from __future__ import annotations

import pytest

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "switch-base-128-jetson-edgemoe-ssd.yaml"
SHORT = ["workload.max_tokens=160", "workload.warmup_tokens=8"]


def test_every_load_reads_flash_first():
    out = simulate(load_scenario(SC, SHORT), record_timeline=True)
    s, tl = out.summary, out.result.timeline
    t = s["transfers"]
    assert s["memory"]["expert_store"] == "ssd"
    assert t["bytes_ssd"] == t["bytes_h2d_experts"] > 0
    sto = out.prepared.scenario.hardware.storage
    reads = sorted((r for r in tl if r[1] == "ssd_read"), key=lambda r: r[2])
    copies = [r for r in tl if r[0] == "gpu0.h2d" and r[1] in ("copy", "prefetch", "copy_stream")]
    assert len(reads) == len(copies)
    for a, b in zip(reads, reads[1:]):
        assert a[3] <= b[2] + 1e-15  # the drive serves one read at a time
    for r in reads:
        assert r[3] - r[2] == pytest.approx(sto.latency_us * 1e-6 + r[7] / (sto.read_gb_s * 1e9))
    ends = sorted(r[3] for r in reads)
    for cp_, rd in zip(sorted(copies, key=lambda r: r[2]), ends):
        assert cp_[2] >= rd - 1e-15  # each link copy starts after its read


def test_flash_is_slower_than_dram_and_needs_storage():
    ssd = simulate(load_scenario(SC, SHORT)).summary
    dram = simulate(load_scenario(SC, [*SHORT, "runtime.expert_store=dram"])).summary
    assert ssd["tpot_ms"]["mean"] > dram["tpot_ms"]["mean"]
    assert ssd["cache"]["hits"] == dram["cache"]["hits"]
    assert dram["transfers"]["bytes_ssd"] == 0
    with pytest.raises(InputError, match="hardware.storage"):
        simulate(load_scenario(ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml", [*SHORT, "runtime.expert_store=ssd"]))


def test_auto_store_moves_experts_that_do_not_fit_dram_to_flash():
    base = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml"
    sets = [*SHORT, "hardware.preset=rtx4090-pcie4", "policies.cache.capacity_experts=48", "hardware.host_memory.capacity_gib=64"]
    s = simulate(load_scenario(base, sets)).summary
    assert s["memory"]["expert_store"] == "ssd" and s["transfers"]["bytes_ssd"] > 0
    with pytest.raises(InputError, match="add hardware.storage"):
        simulate(load_scenario(base, [*sets[:-1], "hardware.preset=a100-80gb-pcie4", "hardware.host_memory.capacity_gib=64"]))
