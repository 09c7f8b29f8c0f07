"""Sweep throughput: scenarios per minute for a small local sweep (8 Mixtral-8x7B offload scenarios
of 256 decode tokens: 4 cache capacities x 2 batch sizes) on all local cores (joblib/loky), each
round into a fresh directory so that nothing is resumed. Worker start-up is included.

Run: ``pytest benchmarks/test_sweep_speed.py`` (``--benchmark-disable`` runs it once).
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from pathlib import Path

import pyarrow.parquet as pq

from moesim.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml"
GRID = ["policies.cache.capacity_experts=32,64,96,128", "workload.batch_size=1,2"]
SETS = ["workload.max_tokens=256", "workload.warmup_tokens=0", "workload.loop_trace=true"]
N = 8


def test_sweep_scenarios_per_minute(benchmark, tmp_path):
    counter = itertools.count()

    def setup():
        return (), {"out": tmp_path / f"round{next(counter)}"}

    walls = []

    def sweep(out):
        t0 = time.perf_counter()
        res = run_sweep(BASE, GRID, [], SETS, out=out, jobs=os.cpu_count())
        walls.append(time.perf_counter() - t0)
        return res

    res = benchmark.pedantic(sweep, setup=setup, rounds=3, iterations=1)
    assert res.ran == N and len(res.rows) == N
    assert pq.read_table(res.parquet).num_rows == N
    per_min = N / statistics.median(walls) * 60
    benchmark.extra_info["scenarios_per_minute"] = per_min
    benchmark.extra_info["jobs"] = os.cpu_count()
    print(f"\nsweep: {per_min:,.0f} scenarios/minute on {os.cpu_count()} cores")
