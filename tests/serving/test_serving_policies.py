"""Every bundled single-GPU scenario (every cache, prefetch, execution, precision and routing
policy in its own configuration) also runs as a serving workload; the policies that need the run's
whole future are refused with one line."""

from __future__ import annotations

import pytest

from moesim.config.loader import load_raw, load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from tests.conftest import ROOT

REQ = ("workload.requests={arrival: {kind: poisson, rate_per_s: 50}, num_requests: 4, prompt_tokens: 12, "
       "output_tokens: {dist: uniform, low: 2, high: 6}}")
FILES = sorted(p for p in (ROOT / "scenarios").glob("*.yaml")
               if "cluster" not in load_raw(p) and "requests" not in (load_raw(p).get("workload") or {}))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_bundled_scenario_serves_requests(path):
    sc = load_scenario(path, [REQ])
    if sc.policies.cache.kind == "belady" or sc.policies.prefetch.kind == "path_table":
        with pytest.raises(InputError, match="whole future"):
            simulate(sc)
        return
    from moesim.engine.throughput import is_throughput

    if is_throughput(sc):  # offline batch systems (MoE-Lightning, Klotski, MoE-Gen): no request arrivals
        with pytest.raises(InputError, match="workload.requests"):
            simulate(sc)
        return
    ngl = getattr(sc.policies.execution, "n_gpu_layers", None)
    if ngl is not None and ngl <= sc.model.num_layers:  # llama.cpp -ngl with CPU blocks: fixed batches only
        with pytest.raises(InputError, match="fixed-batch runs only"):
            simulate(sc)
        return
    s = simulate(sc).summary
    sv = s["serving"]
    assert sv["finished_requests"] == 4
    assert s["tokens"] == sum(sv["output_tokens"]["mean"] for _ in range(4))
    assert s["ttft_ms"]["mean"] > 0 and s["e2e_ms"]["mean"] >= s["ttft_ms"]["mean"]
    assert sv["kv"]["peak_bytes"] <= sv["kv"]["budget_bytes"]
    cp = s["critical_path_ms"]
    assert sum(v for k, v in cp.items() if k != "total") == pytest.approx(cp["total"], rel=1e-9)


def test_expertflow_rebatch_groups_requests_by_routing(tmp_path):
    """ExpertFlow re-batching: requests alternate between two routing groups (experts 0/1 and
    2/3 at the two layers); with room for two decodes per step, grouping runs same-group pairs, so
    each step needs 2 distinct experts instead of 4, and a 2-slot LRU cache stops missing."""
    import numpy as np

    from tests.serving.common import poisson, request_trace, run, scenario

    n, p, d = 8, 4, 15
    rows = []
    for r in range(n):
        g = r % 2
        x = np.empty((p + d, 2, 1), dtype=np.int16)
        x[:, 0, 0] = 2 * g
        x[:, 1, 0] = 2 * g + 1
        rows.append(x)
    path = tmp_path / "groups.npz"
    request_trace(path, [p] * n, [d] * n, rows=rows)
    req = poisson(1e6, n, prompt=p, output=d + 1, routing_rows="by_request")
    out = {}
    for group in (True, False):
        bat = {"kind": "expertflow_rebatch", "decode_batch": 2, "max_num_seqs": n, "group_by_routing": group}
        out[group] = run(scenario(req, bat, cache={"kind": "lru", "capacity_experts": 2}, trace=path)).summary
    g, f = out[True], out[False]
    assert g["serving"]["finished_requests"] == f["serving"]["finished_requests"] == n
    assert g["cache"]["misses"] < f["cache"]["misses"]
    assert g["tokens"] == f["tokens"]
