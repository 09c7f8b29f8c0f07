"""HOBBIT cache at a large capacity (``moesim/policies/cache/hobbit.py``: per-key state in numpy
arrays, a victim chosen by a few vector operations over the pool).

* The engine: Qwen3-30B-A3B (48 MoE layers x 128 experts = 6,144 keys, top-8) decoding 256 tokens
  of its bundled trace at batch 1 on one H100 with a global HOBBIT cache of 3,072 slots,
  warm-started full (so every miss evicts), as layer-steps per wall-second. Events asserted: one
  router wait per (step, MoE layer) and one token wait per step; accesses counted from the trace,
  evictions = misses.
* The policy alone, against the pre-vectorisation scan of the pool (the reference kept in
  ``tests/policies/cache/test_hobbit_vectorised.py``): 48 x 128 keys, 2,000 slots, the same
  decisions asserted; the speed-up is recorded (``extra_info``), not asserted.

Run: ``pytest benchmarks`` (``--benchmark-disable`` runs each once, as CI does).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.policies.cache.hobbit import Hobbit
from moesim.traces import load_trace
from tests.policies.cache.cachetest import make_setup
from tests.policies.cache.test_hobbit_vectorised import HobbitScan

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "traces" / "qwen3-30b-a3b-synth-zipf0.8-reuse0.1-t512.npz"
TOKENS, SLOTS = 256, 3072


def test_hobbit_engine_at_a_large_capacity(benchmark):
    sc = load_scenario(ROOT / "scenarios" / "mixtral-8x7b-h100-hobbit-c96.yaml",
                       ["model={preset: qwen3-30b-a3b}", f"trace={{path: {TRACE}}}",
                        f"policies.cache.capacity_experts={SLOTS}", "policies.cache.warm_start=first",
                        f"workload.max_tokens={TOKENS}", "workload.warmup_tokens=0"])
    out = benchmark.pedantic(simulate, args=(sc,), rounds=3, iterations=1)
    s = out.summary
    L = len(sc.model.moe_layers)
    assert sc.model.num_experts * L == 6144
    assert s["cache"]["slots"] == SLOTS
    assert s["decode_steps"] == TOKENS and s["layer_steps"] == TOKENS * L
    assert s["events_processed"] == TOKENS * (L + 1)
    ex = np.asarray(load_trace(TRACE).experts)[:TOKENS]
    distinct = sum(len(set(ex[t, c].tolist()) - {-1}) for t in range(TOKENS) for c in range(L))
    c = s["cache"]
    assert c["accesses"] == distinct and c["hits"] + c["misses"] == distinct
    assert c["evictions"] == c["misses"] > 0  # full from the start: every load evicts one expert
    rate = s["layer_steps"] / s["wall_time_s"]
    benchmark.extra_info.update({"layer_steps_per_s": rate, "evictions": c["evictions"]})
    print(f"\nHOBBIT {SLOTS} of 6,144 slots, Qwen3-30B-A3B: {c['evictions']:,} evictions, {rate:,.0f} layer-steps/s "
          f"({s['wall_time_s']:.3f} s wall)")


def _drive(policy, steps):
    t, loads = 0, []
    for step in steps:
        for c, needed in enumerate(step):
            loads.append(policy.access(c, needed, t).loads)
            t += 1
    return loads


def test_hobbit_victim_choice_against_the_scan(benchmark):
    rng = np.random.default_rng(0)
    C, E, S, cap = 48, 128, 3, 2000
    steps = [[list(rng.choice(E, size=8, replace=False)) for _ in range(C)] for _ in range(S)]
    cfg = Hobbit.Config(capacity_experts=cap, warm_start="first")

    def fast():
        return _drive(Hobbit(cfg, make_setup(steps, C, E)), steps)

    got = benchmark.pedantic(fast, rounds=3, iterations=1)
    t0 = time.perf_counter()
    ref = _drive(HobbitScan(cfg, make_setup(steps, C, E)), steps)
    scan_s = time.perf_counter() - t0
    assert got == ref  # the same loads, hence the same victims, at every access
    assert sum(len(x) for x in got) > 0
    t0 = time.perf_counter()
    fast()
    fast_s = time.perf_counter() - t0
    benchmark.extra_info.update({"scan_s": scan_s, "vectorised_s": fast_s, "speedup": scan_s / fast_s})
    print(f"\nHOBBIT victim choice, {C * E} keys, {cap} slots, {S * C} accesses: vectorised {fast_s * 1e3:.1f} ms, "
          f"scan {scan_s * 1e3:.1f} ms ({scan_s / fast_s:.1f}x)")
