"""CPU expert detail (moesim.perf.cpu): threads, vector/matrix units, NUMA placement, concurrent
workers sharing DRAM bandwidth; and the end-to-end wiring through the execution policies."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.hardware.spec import CpuSpec
from moesim.models.presets import load_model_preset
from moesim.models.spec import ModelSpec
from moesim.perf.cpu import CpuExpertModel, make_workers
from tests.conftest import ROOT

MIXTRAL = ModelSpec.model_validate(load_model_preset("mixtral-8x7b"))
B = MIXTRAL.expert_bytes

XEON = {  # a dual-socket AMX Xeon, numbers round for hand checks (not a preset)
    "name": "test-xeon-2s", "sockets": 2, "cores_per_socket": 32, "dram_bandwidth_gb_s": 400.0,
    "peak_gflops_fp32": 8192.0, "peak_gflops_bf16": 131072.0, "compute_efficiency": 0.5,
    "core_bandwidth_gb_s": 10.0, "cross_socket_bandwidth_gb_s": 50.0,
    "units": {"avx512": {"fp32": 128.0, "bf16": 256.0}, "amx": {"bf16": 2048.0, "int8": 4096.0}},
}


def cpu(**kw) -> CpuSpec:
    d = copy.deepcopy(XEON)
    d.update(kw)
    return CpuSpec.model_validate(d)


def alone(spec, threads, tokens=1, unit="avx512", placement="interleave", worker=0, home=None):
    m = CpuExpertModel(MIXTRAL, spec, threads=threads, unit=unit, placement=placement)
    w = m.workers[worker]
    return m.alone(tokens, w, w.nodes[0] if home is None else home)[0]


def test_time_falls_with_threads_until_the_bandwidth_bound():
    spec = cpu()
    ts = [1, 2, 4, 8, 16, 32]
    t = [alone(spec, n, placement="node_local") for n in ts]  # one node, weights local
    # each core pulls at most 10 GB/s: the time halves per doubling until the node's 200 GB/s
    for n, x in zip(ts, t):
        assert x == pytest.approx(max(B / (n * 10e9), B / 200e9), rel=1e-12)
    assert all(b <= a for a, b in zip(t, t[1:]))
    assert t[3] > t[4] > t[5] == t[5] == pytest.approx(B / 200e9, rel=1e-12)
    # 64 threads over both sockets with kTransformers-style shards: half the bytes from each node
    assert alone(spec, 64, placement="node_sharded") == pytest.approx((B / 2) / 200e9, rel=1e-12)
    # without a per-core limit a few threads already reach the node's bandwidth at decode
    flat = cpu(core_bandwidth_gb_s=None)
    assert alone(flat, 4, placement="node_local") == pytest.approx(alone(flat, 16, placement="node_local"), rel=1e-12)
    # in the compute-bound regime (a prefill chunk) the FLOP term falls with threads all the way
    big = [alone(flat, n, tokens=4096, unit="avx512") for n in (4, 8, 16)]
    assert big[0] > big[1] > big[2]


def test_amx_beats_avx512_only_when_compute_bound():
    spec = cpu()
    for tokens, amx_wins in [(1, False), (8, False), (2048, True)]:
        a = alone(spec, 16, tokens=tokens, unit="amx")
        v = alone(spec, 16, tokens=tokens, unit="avx512")
        assert (a < v) == amx_wins, tokens
        if not amx_wins:
            assert a == pytest.approx(v, rel=1e-12)  # both at the DRAM bound


def test_remote_expert_is_slower_than_node_local():
    spec = cpu(core_bandwidth_gb_s=None)
    m = CpuExpertModel(MIXTRAL, spec, threads=32, unit="avx512", placement="node_local")
    w0 = m.workers[0]
    assert w0.nodes == (0,)
    local = m.alone(1, w0, home=0)[0]
    remote = m.alone(1, w0, home=1)[0]
    assert local == pytest.approx(B / 200e9, rel=1e-12)
    assert remote == pytest.approx(B / 50e9, rel=1e-12)  # through the cross-socket port
    # interleaved pages: half of every thread's bytes cross sockets
    inter = alone(spec, 32, placement="interleave")
    assert local < inter == pytest.approx((B / 2) / 50e9, rel=1e-12)
    # sub-NUMA nodes of one socket do not pay the cross-socket rate
    snc = cpu(core_bandwidth_gb_s=None, numa_nodes_per_socket=2)
    m2 = CpuExpertModel(MIXTRAL, snc, threads=16, unit="avx512", placement="node_local")
    assert m2.alone(1, m2.workers[0], home=1)[0] == pytest.approx(B / 100e9, rel=1e-12)
    assert m2.alone(1, m2.workers[0], home=2)[0] == pytest.approx(B / 50e9, rel=1e-12)


def test_workers_and_sharing():
    spec = cpu(core_bandwidth_gb_s=None)
    assert [w.nodes for w in make_workers(spec, 16)] == [(0,), (0,), (1,), (1,)]
    assert [w.nodes for w in make_workers(spec, 64)] == [(0, 1)]
    with pytest.raises(InputError, match="exceeds the CPU's 64 cores"):
        make_workers(spec, 65)
    m = CpuExpertModel(MIXTRAL, spec, threads=16, unit="avx512", placement="node_local")
    one = B / 200e9
    # two experts homed on node 0 picked by node-0 workers share node 0's bandwidth: 2 x one
    free = [0.0] * 4
    runs = m.schedule([(0.0, 1, 0, 1.0), (0.0, 1, 2, 1.0)], free)
    assert [r[2] for r in runs] == [0, 1]
    assert all(r[1] == pytest.approx(2 * one, rel=1e-9) for r in runs)
    # one on each node: no sharing
    runs = m.schedule([(0.0, 1, 0, 1.0), (0.0, 1, 1, 1.0)], [0.0] * 4)
    assert all(r[1] == pytest.approx(one, rel=1e-9) for r in runs)
    # a copy slows every CPU job by f_dram while it runs
    runs = m.schedule([(0.0, 1, 0, 1.0)], [0.0] * 4, copies=[(0.0, one)], f_dram=2.0)
    assert runs[0][1] == pytest.approx(one + one / 2, rel=1e-9)


cpus = st.builds(
    lambda sockets, nps, cps, bw, node_frac, cross, core, eff: CpuSpec(
        name="h", sockets=sockets, numa_nodes_per_socket=nps, cores_per_socket=cps * nps,
        dram_bandwidth_gb_s=bw, node_bandwidth_gb_s=bw / (sockets * nps) * node_frac,
        cross_socket_bandwidth_gb_s=cross, core_bandwidth_gb_s=core,
        peak_gflops_fp32=100.0 * cps, peak_gflops_bf16=200.0 * cps, compute_efficiency=eff,
        units={"amx": {"bf16": 1000.0}, "avx512": {"fp32": 64.0}},
    ),
    st.integers(1, 2), st.integers(1, 2), st.integers(1, 16), st.floats(20, 800), st.floats(0.3, 1.0),
    st.none() | st.floats(5, 200), st.none() | st.floats(1, 40), st.floats(0.1, 1.0),
)


@settings(max_examples=150, deadline=None)
@given(spec=cpus, tfrac=st.floats(0, 1), unit=st.sampled_from(["auto", "amx"]),
       placement=st.sampled_from(["interleave", "node_local", "node_sharded"]),
       jobs=st.lists(st.tuples(st.floats(0, 0.05), st.integers(1, 64), st.integers(0, 255)), min_size=1, max_size=12),
       copy=st.floats(0, 0.05), f=st.floats(1.0, 3.0))
def test_cpu_expert_never_beats_total_dram_bandwidth(spec, tfrac, unit, placement, jobs, copy, f):
    threads = max(1, int(round(tfrac * spec.cores)))
    m = CpuExpertModel(MIXTRAL, spec, threads=threads, unit=unit, placement=placement)
    floor = B / (spec.dram_bandwidth_gb_s * 1e9)
    for w in m.workers:
        for home in range(spec.numa_nodes):
            assert m.alone(1, w, home)[0] >= floor * (1 - 1e-9)
    jobs = sorted(jobs)
    runs = m.schedule([(r, n, k, 1.0) for r, n, k in jobs], [0.0] * len(m.workers), [(0.0, copy)], f)
    for (r, _, _), (a, b, w) in zip(jobs, runs):
        assert a >= r - 1e-15 and b - a >= floor * (1 - 1e-9)
    # all the bytes read in a window never exceed what the DRAM gives in that window
    start, end = min(a for a, _, _ in runs), max(b for _, b, _ in runs)
    assert len(runs) * B <= spec.dram_bandwidth_gb_s * 1e9 * (end - start) * (1 + 1e-9)
    # a worker runs one job at a time
    by_w: dict = {}
    for a, b, w in runs:
        by_w.setdefault(w, []).append((a, b))
    for iv in by_w.values():
        iv.sort()
        assert all(x[1] <= y[0] + 1e-12 for x, y in zip(iv, iv[1:]))


def test_spec_checks():
    with pytest.raises(ValueError, match="exceeds dram_bandwidth_gb_s"):
        cpu(node_bandwidth_gb_s=300.0)
    with pytest.raises(ValueError, match="channels' peak"):
        cpu(dram_channels_per_socket=2, dram_mt_s=3200.0)
    with pytest.raises(ValueError, match="at least one of"):
        cpu(units={"amx": {}})
    with pytest.raises(InputError, match="no 'avx2' unit"):
        CpuExpertModel(MIXTRAL, cpu(), threads=4, unit="avx2")
    with pytest.raises(InputError, match="no rate for fp32"):
        CpuExpertModel(MIXTRAL.model_copy(update={"dtype": "fp32"}), cpu(), threads=4, unit="amx")


# ----- end to end ---------------------------------------------------------------------------------
SC = ROOT / "scenarios"
SHORT = ["workload.max_tokens=24", "workload.warmup_tokens=4"]


def tpot(name, *sets):
    return simulate(load_scenario(SC / name, [*SHORT, *sets])).summary


def test_default_cpu_settings_keep_the_aggregate_model():
    # threads_per_expert = all 16 cores matches the measured 16-thread table: the worker
    # scheduler reproduces the one-expert-at-a-time path exactly
    a = tpot("mixtral-8x7b-h100-ktransformers.yaml")
    b = tpot("mixtral-8x7b-h100-ktransformers.yaml", "policies.execution.threads_per_expert=16")
    assert b["tpot_ms"]["mean"] == pytest.approx(a["tpot_ms"]["mean"], rel=1e-9)
    assert "16 threads/expert, 1 worker(s)" in b["predictor"]["cpu_expert"]
    assert "table at 16 threads" in b["predictor"]["cpu_expert"]
    assert a["predictor"]["cpu_expert"] == "profile table h100-host-cpu"


def test_fewer_threads_per_expert_run_experts_concurrently():
    # 8 threads: two workers, roofline alone-times, both sharing the one node's DRAM bandwidth. The
    # H100 host's fitted CPU model adds arithmetic to streaming and a fixed per-call cost (there one
    # worker streams while the other computes); this checks the sharing rule with the pure
    # overlapped roofline, where decode is DRAM-bound
    roof = ("hardware.cpu.overlap_compute_and_memory=true", "hardware.cpu.call_overhead_us=null")
    s = tpot("mixtral-8x7b-h100-ktransformers.yaml", "policies.execution.threads_per_expert=8",
             "workload.batch_size=4", *roof)
    assert "2 worker(s)" in s["predictor"]["cpu_expert"] and "thread roofline" in s["predictor"]["cpu_expert"]
    one = tpot("mixtral-8x7b-h100-ktransformers.yaml", "policies.execution.threads_per_expert=16",
               "hardware.cpu_expert_profile=null", "workload.batch_size=4", *roof)
    # decode is DRAM-bound: two workers sharing one node's bandwidth gain nothing over one
    assert s["tpot_ms"]["mean"] == pytest.approx(one["tpot_ms"]["mean"], rel=1e-6)
    # with the fitted (non-overlapped) model two workers do gain: one streams while the other computes
    s2 = tpot("mixtral-8x7b-h100-ktransformers.yaml", "policies.execution.threads_per_expert=8",
              "workload.batch_size=4")
    one2 = tpot("mixtral-8x7b-h100-ktransformers.yaml", "policies.execution.threads_per_expert=16",
                "hardware.cpu_expert_profile=null", "workload.batch_size=4")
    assert s2["tpot_ms"]["mean"] < one2["tpot_ms"]["mean"]


def test_bad_cpu_unit_is_one_line():
    # the A100 host (Zen 3) has no AMX
    with pytest.raises(InputError, match="policies.execution.cpu_unit.*no 'amx' unit"):
        simulate(load_scenario(SC / "mixtral-8x7b-h100-ktransformers.yaml",
                               [*SHORT, "policies.execution.cpu_unit=amx", "hardware.preset=a100-80gb-pcie4"]))
