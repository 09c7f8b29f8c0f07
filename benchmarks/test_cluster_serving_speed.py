"""Co-located expert-parallel serving speed (``moesim/serving/ep_serving.py``):
``scenarios/deepseek-v3-4x8h100-serving-colocated.yaml`` (DeepSeek-V3 on 32 H100s, 240 Poisson
requests, two-micro-batch overlap), timed as a whole: the step-cost table's expert-parallel runs
first, then the request-level SimPy model. Event counts asserted at both levels:

* table runs: two per grid point (context 0 and the longest context that fits; one when no
  context fits), each a fixed-batch run of 2 decode steps whose events are, per step, one per
  micro-batch per MoE layer (the overlapped step waits for each micro-batch's combine) and one
  tail, plus one step wait; with one sequence per rank (a single micro-batch) the plain step's
  four stages per MoE layer instead;
* the request level: one event per arrival and one per serving step (no event per token).

Run: ``pytest benchmarks`` (``--benchmark-disable`` runs each once, as CI does).
"""

from __future__ import annotations

from pathlib import Path

import moesim.serving.cluster_tables as ct
from moesim.config.loader import load_scenario
from moesim.engine.run import simulate

ROOT = Path(__file__).resolve().parents[1]


def test_colocated_ep_serving(benchmark, monkeypatch):
    sc = load_scenario(ROOT / "scenarios" / "deepseek-v3-4x8h100-serving-colocated.yaml")
    runs: list = []
    real = ct.run_pool

    def counted(d, source):  # every table run's scenario and summary
        s = real(d, source)
        runs.append((d, s))
        return s

    monkeypatch.setattr(ct, "run_pool", counted)
    out = benchmark.pedantic(simulate, args=(sc,), rounds=1, iterations=1)
    s = out.summary
    res, c = out.result, out.prepared
    L = len(sc.model.moe_layers)
    mb = sc.parallel.micro_batches
    # table runs: one grid point = one or two runs
    tab = c.table_before
    assert len(runs) == sum(1 + (ctx > 0) for ctx in tab.context_measured)
    table_events = 0
    for d, rs in runs:
        n = d["workload"]["batch_size"]
        m = min(mb, n)
        steps = rs["decode_steps"] + rs["warmup_steps"]
        assert steps == tab.steps
        per_step = (L * m + 1) if m > 1 else (4 * L + 1)
        assert rs["events_processed"] == steps * per_step + steps
        table_events += rs["events_processed"]
    # the request level
    sv = s["serving"]
    assert sv["finished_requests"] == sv["requests"] == 240
    steps = len(res.step_s)
    assert s["events_processed"] == res.events == sv["requests"] + steps
    table_wall = sum(rs["wall_time_s"] for _, rs in runs)
    benchmark.extra_info.update({"table_runs": len(runs), "table_events": table_events, "table_wall_s": table_wall,
                                 "request_events": s["events_processed"], "wall_time_s": s["wall_time_s"]})
    print(f"\nco-located serving: {len(runs)} table runs ({table_events:,} events, {table_wall:.2f} s), {steps} "
          f"serving steps + {sv['requests']} arrivals = {s['events_processed']:,} request-level events; "
          f"{s['wall_time_s']:.2f} s wall in all")
