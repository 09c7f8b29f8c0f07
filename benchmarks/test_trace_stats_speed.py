"""`trace_statistics` on a 10-million token-layer-row trace (312,500 tokens x 32 layers x top-2, 8
experts) must analyse in seconds (issue 5, item 5). The hit-rate table is skipped (capacities=[]):
it replays the cache policies access by access in Python and is capped by ``hit_max_tokens`` in
normal use.

Run: ``pytest benchmarks`` (``--benchmark-disable`` runs it once, as CI does).
"""

from __future__ import annotations

import time

import pytest

from moesim.traces import synthesize
from moesim.traces.stats import trace_statistics

LIMIT_S = 30.0


@pytest.fixture(scope="module")
def big_trace():
    return synthesize(num_tokens=312_500, layers=list(range(32)), num_experts=8, top_k=2, seed=0)


def test_trace_statistics_10m_rows(benchmark, big_trace):
    assert big_trace.num_tokens * big_trace.num_layers == 10_000_000
    walls = []

    def timed():
        t0 = time.perf_counter()
        out = trace_statistics(big_trace, capacities=[])
        walls.append(time.perf_counter() - t0)
        return out

    st = benchmark.pedantic(timed, rounds=1, iterations=1)
    assert st["tokens"] == 312_500 and st["segments"]["256"]["windows"] == 312_500 - 255
    best = min(walls)
    benchmark.extra_info["wall_s"] = best
    benchmark.extra_info["rows"] = 10_000_000
    assert best < LIMIT_S
