"""Throughput-engine speed (``moesim/engine/throughput.py``): Klotski on a T4
(``scenarios/mixtral-8x7b-t4-klotski.yaml``) for 32 decode steps of 8 batches x 16 sequences
(the trace's 4,096 rows exactly), with the SimPy event count asserted against the schedule's
formula: one op per (batch, block) attention, per (step, batch) LM head, per (step, block)
distinct expert kernel (the union of the batches' routing, counted here from the trace), per
(step, block) dense-weight copy and per expert copy (a load for every used expert the block did
not prefetch, plus every prefetch issued); every op has a positive duration, so it costs one
timeout and one completion event, plus a start and an end event per resource process (GPU stream,
H2D copy engine).

Run: ``pytest benchmarks`` (``--benchmark-disable`` runs each once, as CI does).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.traces import load_trace

ROOT = Path(__file__).resolve().parents[1]
STEPS = 32


def test_klotski_throughput_engine_ops_per_second(benchmark):
    sc = load_scenario(ROOT / "scenarios" / "mixtral-8x7b-t4-klotski.yaml",
                       # prompts of 480 so that the KV cache at the final context (512) of 8 batches fits
                       [f"policies.execution.decode_steps={STEPS}", "workload.context_tokens=480"])
    out = benchmark.pedantic(simulate, args=(sc,), rounds=3, iterations=1)
    s = out.summary
    dag = out.prepared.ctx.dag
    n = s["throughput"]["batches"]
    bsz = sc.workload.batch_size
    N = n * bsz  # sequences per step
    L = sc.model.num_layers
    ex = np.asarray(load_trace(ROOT / "traces" / "mixtral-8x7b-synth.npz").experts)
    assert ex.shape[0] == STEPS * N  # one step = the next N rows of the trace, no looping
    # distinct experts of each (step, block): the union of the n batches' rows
    used = {(st, b): {int(e) for e in np.unique(ex[st * N:(st + 1) * N, b]) if e >= 0}
            for st in range(STEPS) for b in range(L)}
    # the policy's prefetches (its decisions), and how many of them a block then used
    pre: dict = {}
    for i, k in enumerate(dag.kind):
        if k == "expert_prefetch":
            pre.setdefault((dag.step[i], dag.layer[i]), set()).add(dag.expert[i])
    n_pre = sum(len(v) for v in pre.values())
    pre_used = sum(len(v & used[key]) for key, v in pre.items())
    distinct = sum(len(v) for v in used.values())
    kinds = Counter(dag.kind)
    assert kinds["attention_gpu"] == STEPS * L * n
    assert kinds["head"] == STEPS * n
    assert kinds["expert"] == distinct
    assert kinds["dense_weights"] == STEPS * L
    assert kinds["expert_load"] == distinct - pre_used
    assert kinds["expert_prefetch"] == n_pre
    ops = STEPS * L * n + STEPS * n + distinct + STEPS * L + (distinct - pre_used) + n_pre
    assert len(dag) == ops
    assert all(d > 0 for d in dag.dur)
    assert s["events_processed"] == 2 * ops + 4  # timeout + completion per op; start + end of GPU and H2D processes
    # the measured steps' cache counters are the same union (warm-up steps left out)
    W = sc.policies.execution.warmup_steps
    assert s["cache"]["accesses"] == sum(len(v) for (st, _), v in used.items() if st >= W)
    rate = len(dag) / s["wall_time_s"]
    benchmark.extra_info["ops_per_s"] = rate
    benchmark.extra_info["events"] = s["events_processed"]
    print(f"\nKlotski, {STEPS} steps x {n} batches x {bsz}: {len(dag):,} ops, {s['events_processed']:,} events, "
          f"{rate:,.0f} ops/s ({s['wall_time_s']:.3f} s wall)")
