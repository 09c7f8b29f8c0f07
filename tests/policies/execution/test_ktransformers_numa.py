"""kTransformers on a dual-socket AMX host: NUMA-aware tensor parallelism (node-sharded experts)
beats a NUMA-oblivious interleaved layout, and AMX buys nothing at decode (DRAM-bound), as the
kTransformers authors note by using AVX-512 kernels for decode and AMX for prefill."""

from __future__ import annotations

import pytest

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "mixtral-8x7b-h100-xeon2s-ktransformers-amx.yaml"


def run(*sets):
    return simulate(load_scenario(SC, ["workload.max_tokens=24", "workload.warmup_tokens=4", *sets])).summary


def test_node_sharded_beats_interleaved_weights():
    sharded = run()
    inter = run("policies.execution.numa_placement=interleave")
    assert sharded["tpot_ms"]["mean"] < inter["tpot_ms"]["mean"]
    # every routed expert on the CPU; sharded reads stay local, so an expert takes its bytes over
    # both sockets' bandwidth; interleaved, half of each socket's reads cross the 100 GB/s UPI
    hw = load_scenario(SC).hardware.cpu
    assert "node_sharded" in sharded["predictor"]["cpu_expert"]
    assert sharded["cache"]["cpu_executed"] == sharded["cache"]["accesses"] > 0
    assert hw.cross_socket_bandwidth_gb_s < hw.node_bandwidth


def test_amx_equals_avx512_at_decode():
    a = run()
    v = run("policies.execution.cpu_unit=avx512")
    assert a["tpot_ms"]["mean"] == pytest.approx(v["tpot_ms"]["mean"], rel=1e-12)
