"""CPU expert-worker model speed (``moesim/perf/cpu.py``): kTransformers on a dual-socket Xeon
(``scenarios/mixtral-8x7b-h100-xeon2s-ktransformers-amx.yaml``, every routed expert on the CPU),
the trace's 4,096 rows at batch 8 (512 steps): as bundled (one 72-thread worker, NUMA-sharded
experts) and with 8 workers of 9 threads on node-local experts, where up to 8 expert jobs per layer
share DRAM and cross-socket bandwidth (the proportional-share fluid model, recomputed at every job
start and end). The CPU workers are a timeline, not SimPy processes, so the event count stays one
router wait per (step, MoE layer) and one token wait per step; the CPU jobs are asserted to be
exactly the distinct experts of every (step, layer), counted from the trace.

Run: ``pytest benchmarks`` (``--benchmark-disable`` runs each once, as CI does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.traces import load_trace

ROOT = Path(__file__).resolve().parents[1]
B = 8


@pytest.mark.parametrize("workers", ["1x72-sharded", "8x9-node_local"])
def test_ktransformers_cpu_workers_layer_steps_per_second(benchmark, workers):
    ex = np.asarray(load_trace(ROOT / "traces" / "mixtral-8x7b-synth.npz").experts)
    T = ex.shape[0]
    sets = [f"workload.batch_size={B}", f"workload.max_tokens={T}", "workload.warmup_tokens=0"]
    if workers == "8x9-node_local":
        sets += ["policies.execution.threads_per_expert=9", "policies.execution.numa_placement=node_local"]
    sc = load_scenario(ROOT / "scenarios" / "mixtral-8x7b-h100-xeon2s-ktransformers-amx.yaml", sets)
    out = benchmark.pedantic(simulate, args=(sc,), rounds=3, iterations=1)
    s = out.summary
    L = len(sc.model.moe_layers)
    S = T // B
    assert s["decode_steps"] == S and s["layer_steps"] == S * L
    assert s["events_processed"] == S * (L + 1)
    # every (step, layer)'s distinct experts run once on the CPU (kTransformers: all routed experts)
    blocks = ex.reshape(S, B, L, -1)
    distinct = sum(len(set(blocks[st, :, c].ravel().tolist()) - {-1}) for st in range(S) for c in range(L))
    assert s["cache"]["accesses"] == s["cache"]["cpu_executed"] == distinct
    rate = s["layer_steps"] / s["wall_time_s"]
    benchmark.extra_info["layer_steps_per_s"] = rate
    benchmark.extra_info["cpu_jobs"] = distinct
    print(f"\nkTransformers {workers}, batch {B}: {distinct:,} CPU expert jobs, {rate:,.0f} layer-steps/s "
          f"({s['wall_time_s']:.3f} s wall, TPOT {s['tpot_ms']['mean']:.1f} ms)")
