"""The dashboard's default what-if run (the What-if page's first answer: the default bundled scenario
under the default token cap, validated, hashed and simulated without a cache) must answer in under
two seconds on the 2-core development machine (issue 7).

Run: ``pytest benchmarks`` (``--benchmark-disable`` runs it once, as CI does).
"""

from __future__ import annotations

import time

from dashboard import common as C

LIMIT_S = 2.0


def default_whatif() -> dict:
    raw = C.with_token_cap(C.load_bundled(C.DEFAULT_SCENARIO), C.DEFAULT_MAX_TOKENS)
    sc = C.validate_raw(raw)
    C.scenario_key(sc)
    return C.simulate_slim(sc)


def test_default_whatif_under_two_seconds(benchmark):
    walls = []

    def timed():
        t0 = time.perf_counter()
        out = default_whatif()
        walls.append(time.perf_counter() - t0)
        return out

    out = benchmark(timed)
    s = out["summary"]
    assert s["warmup_steps"] == 32  # the scenario's warm-up, not counted below
    assert s["decode_steps"] == s["tokens"] == C.DEFAULT_MAX_TOKENS - 32
    layers = len(s["per_layer"])
    assert s["events_processed"] == C.DEFAULT_MAX_TOKENS * (layers + 1)  # warm-up steps included
    best = min(walls)
    benchmark.extra_info["wall_s"] = best
    print(f"\ndefault what-if run: {best:.3f} s wall ({len(walls)} rounds)")
    assert best < LIMIT_S, f"default what-if run took {best:.2f} s (limit {LIMIT_S} s)"
