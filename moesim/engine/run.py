"""Running one scenario end to end: prepare, simulate, summarise."""

from __future__ import annotations

import time
from dataclasses import dataclass

from moesim.config.loader import scenario_hash
from moesim.engine.build import Prepared, prepare
from moesim.engine.single_gpu import EngineResult
from moesim.engine.throughput import is_throughput
from moesim.metrics.summary import build_summary


@dataclass
class RunOutput:
    """A finished run: its summary, the prepared inputs and the raw engine result."""

    summary: dict
    prepared: Prepared
    result: EngineResult
    scenario_hash: str
    requests: object = None  # serving runs: requests.parquet's table (pyarrow), else None


def simulate(scenario, *, source: str = "scenario", record_timeline: bool = False, progress=None) -> RunOutput:
    """Simulate ``scenario`` (a validated Scenario model) and return its summary."""
    t0 = time.perf_counter()
    if getattr(scenario, "cluster", None) is not None and scenario.workload.requests is not None:
        if scenario.parallel.prefill_gpus is None:  # co-located (or attention-FFN) serving
            return _simulate_cluster_serving(scenario, source=source, t0=t0)
        return _simulate_pd(scenario, source=source, t0=t0)
    if getattr(scenario, "cluster", None) is not None:
        return _simulate_ep(scenario, source=source, record_timeline=record_timeline, progress=progress, t0=t0)
    if is_throughput(scenario):  # MoE-Lightning, Klotski, MoE-Gen: the throughput engine
        return _simulate_throughput(scenario, source=source, record_timeline=record_timeline, t0=t0)
    prep = prepare(scenario, source=source, record_timeline=record_timeline, progress=progress)
    res = prep.engine.run()
    h = scenario_hash(scenario, prep.trace_sha256)
    summary = build_summary(prep, res, scenario_hash=h, wall_time_s=time.perf_counter() - t0)
    table = None
    if prep.serving is not None:
        from moesim.serving.metrics import requests_table

        table = requests_table(prep.serving, scenario.workload.requests.slo)
    return RunOutput(summary=summary, prepared=prep, result=res, scenario_hash=h, requests=table)


def prepare_any(scenario, *, source: str = "scenario", record_timeline: bool = False):
    """The checks a run makes before it starts (trace, memory, policies), single- or multi-GPU."""
    if getattr(scenario, "cluster", None) is not None and scenario.workload.requests is not None:
        from types import SimpleNamespace  # serving on a cluster (P/D or co-located): checked when it runs

        return SimpleNamespace(trace_sha256=None if scenario.trace.path is None else _trace_sha(scenario))
    if getattr(scenario, "cluster", None) is not None:
        from moesim.engine.build_ep import prepare_ep

        return prepare_ep(scenario, source=source, record_timeline=record_timeline)
    if is_throughput(scenario):
        from moesim.engine.throughput import prepare_throughput

        return prepare_throughput(scenario, source=source, record_timeline=record_timeline)
    return prepare(scenario, source=source, record_timeline=record_timeline)


def _simulate_ep(scenario, *, source, record_timeline, progress, t0) -> RunOutput:
    from moesim.engine.build_ep import prepare_ep
    from moesim.metrics.ep_summary import build_ep_summary

    prep = prepare_ep(scenario, source=source, record_timeline=record_timeline, progress=progress)
    res = prep.engine.run()
    h = scenario_hash(scenario, prep.trace_sha256)
    summary = build_ep_summary(prep, res, scenario_hash=h, wall_time_s=time.perf_counter() - t0)
    return RunOutput(summary=summary, prepared=prep, result=res, scenario_hash=h)


def _simulate_pd(scenario, *, source, t0) -> RunOutput:
    from moesim.serving.pd_disagg import pd_summary, run_pd

    res, tables, mem = run_pd(scenario, source=source)
    h = scenario_hash(scenario, None if scenario.trace.path is None else _trace_sha(scenario))
    summary, table = pd_summary(scenario, res, tables, mem, scenario_hash=h, wall_time_s=time.perf_counter() - t0)
    return RunOutput(summary=summary, prepared=tables, result=res, scenario_hash=h, requests=table)


def _simulate_cluster_serving(scenario, *, source, t0) -> RunOutput:
    from moesim.serving.ep_serving import cluster_serving_summary, run_cluster_serving

    built, res = run_cluster_serving(scenario, source=source)
    h = scenario_hash(scenario, None if scenario.trace.path is None else _trace_sha(scenario))
    summary, table = cluster_serving_summary(built, res, scenario_hash=h, wall_time_s=time.perf_counter() - t0)
    return RunOutput(summary=summary, prepared=built, result=res, scenario_hash=h, requests=table)


def _simulate_throughput(scenario, *, source, record_timeline, t0) -> RunOutput:
    from moesim.engine.throughput import prepare_throughput
    from moesim.metrics.throughput_summary import build_throughput_summary

    prep = prepare_throughput(scenario, source=source, record_timeline=record_timeline)
    res = prep.engine.run()
    h = scenario_hash(scenario, prep.trace_sha256)
    summary = build_throughput_summary(prep, res, scenario_hash=h, wall_time_s=time.perf_counter() - t0)
    return RunOutput(summary=summary, prepared=prep, result=res, scenario_hash=h)


def _trace_sha(scenario) -> str:
    from moesim.traces.format import trace_sha256

    return trace_sha256(scenario.trace.path)
