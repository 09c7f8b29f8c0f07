"""Running one scenario end to end: prepare, simulate, summarise."""

from __future__ import annotations

import time
from dataclasses import dataclass

from moesim.config.loader import scenario_hash
from moesim.engine.build import Prepared, prepare
from moesim.engine.single_gpu import EngineResult
from moesim.metrics.summary import build_summary


@dataclass
class RunOutput:
    """A finished run: its summary, the prepared inputs and the raw engine result."""

    summary: dict
    prepared: Prepared
    result: EngineResult
    scenario_hash: str


def simulate(scenario, *, source: str = "scenario", record_timeline: bool = False, progress=None) -> RunOutput:
    """Simulate ``scenario`` (a validated Scenario model) and return its summary."""
    t0 = time.perf_counter()
    prep = prepare(scenario, source=source, record_timeline=record_timeline, progress=progress)
    res = prep.engine.run()
    h = scenario_hash(scenario, prep.trace_sha256)
    summary = build_summary(prep, res, scenario_hash=h, wall_time_s=time.perf_counter() - t0)
    return RunOutput(summary=summary, prepared=prep, result=res, scenario_hash=h)
