"""Co-located expert-parallel serving (moesim.serving.ep_serving): Little's law, a lone request's
latency against the fixed-batch EP engine, AFD under arrivals, elastic scaling under arrivals
(no request lost, disruption in the latencies, the bigger pool's throughput after), the bundled
DeepSeek-V3 serving scenarios."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesim.config.loader import load_scenario, scenario_from_dict
from moesim.engine.run import simulate

ROOT = Path(__file__).resolve().parents[2]


def _dict(rate=50.0, n=40, prompt=96, output=6, par=None, batching=None, **req):
    return {
        "name": "ep-serving-test",
        "model": {"preset": "mixtral-8x7b"},
        "hardware": {"preset": "h100-sxm-pcie5"},
        "cluster": {"preset": "dgx-h100", "nodes": 2, "gpus_per_node": 4, "nic": {"nics_per_node": 4}},
        "parallel": par or {},
        "trace": {"synthetic": {"tokens": 512, "zipf_s": 0.8, "reuse_prob": 0.2, "seed": 1}},
        "workload": {"requests": {"arrival": {"kind": "poisson", "rate_per_s": rate}, "num_requests": n,
                                  "prompt_tokens": prompt, "output_tokens": output, **req}},
        "runtime": {"launch_mode": "graph", "wait_for_router": False},
        "policies": {"cache": {"kind": "all_resident"}, "placement": {"kind": "contiguous"},
                     "alltoall": {"kind": "direct"},
                     "batching": batching or {"kind": "continuous", "max_num_seqs": 16, "max_batched_tokens": 128}},
    }


def _run(**kw):
    return simulate(scenario_from_dict(_dict(**kw)))


def test_littles_law_and_every_request_finishes():
    out = _run(rate=50.0, n=300)
    s = out.summary
    sv = s["serving"]
    assert sv["finished_requests"] == 300
    end = s["sim_time_s"]
    # the exact identity over a run that starts and ends empty: L = (N / T) W
    assert sv["mean_in_system"] == pytest.approx(300 / end * sv["mean_e2e_s"], rel=1e-9)
    # and Little's law with the arrival rate the arrivals had
    assert sv["mean_in_system"] == pytest.approx(sv["arrival_rate_per_s"] * sv["mean_e2e_s"], rel=0.05)
    reqs = out.result.requests
    assert all(r.finish >= r.first_token >= r.first_sched >= r.arrival for r in reqs)
    assert all(r.generated == r.output for r in reqs)


def test_a_lone_request_decodes_exactly_as_the_fixed_batch_ep_run_at_batch_one():
    P, O = 64, 3  # O - 1 = 2 decode steps, the table's run length
    sc = scenario_from_dict(_dict(n=1, prompt=P, output=O))
    out = simulate(sc)
    r = out.result.requests[0]
    d = _dict(n=1, prompt=P, output=O)
    d["workload"] = {"batch_size": 1, "max_tokens": 8 * (O - 1), "context_tokens": P, "loop_trace": True}
    d["policies"].pop("batching")
    fixed = simulate(scenario_from_dict(d)).summary
    # 8 ranks of one sequence each, contexts P, P+1: the same rows, placement and contexts
    assert r.finish - r.first_token == pytest.approx(fixed["measured_time_s"], rel=1e-12)
    assert out.summary["tpot_ms"]["mean"] == pytest.approx(fixed["tpot_ms"]["mean"], rel=1e-12)
    # the prefill: the table's n = P rows at context 0 plus causal attention over the prompt
    c = out.prepared
    assert r.first_token - r.arrival == pytest.approx(c.table_before.time(P, 0) + c.pair_s * P * (P - 1) / 2)


def test_afd_serves_arrivals_and_its_table_passes_through_the_engine_runs():
    par = {"attention_gpus": 4, "micro_batches": 2}
    out = _run(rate=100.0, n=80, output=16, par=par)
    s = out.summary
    assert s["serving"]["finished_requests"] == 80
    assert s["serving"]["mode"] == "attention-FFN disaggregated"
    assert s["cluster_serving"]["ranks"] == 4  # only the attention pool has ranks
    # at a grid point and its measured context, the table is the AFD engine's own step time
    c = out.prepared
    tab = c.table_before
    i = tab.n.index(8)
    ctx = tab.context_measured[i]
    d = _dict(par=par)
    d["workload"] = {"batch_size": 8, "max_tokens": 4 * 8 * 2, "context_tokens": ctx, "loop_trace": True}
    d["policies"].pop("batching")
    fixed = simulate(scenario_from_dict(d)).summary
    assert tab.time(8, ctx + 0.5) == pytest.approx(fixed["tpot_ms"]["mean"] * 1e-3, rel=1e-9)
    # the same requests co-located on the same 8 GPUs: both finish everything
    co = _run(rate=100.0, n=80, output=16).summary
    assert co["serving"]["finished_requests"] == 80
    assert co["cluster_serving"]["ranks"] == 8


def test_elastic_scale_up_loses_no_request_and_pays_its_disruption():
    el = {"elastic": {"start_gpus": 4, "at_step": 20, "planning_ms": 5.0}}
    out = _run(rate=400.0, n=200, output=32, par=el)
    s = out.summary
    rep = s["cluster_serving"]["elastic"]
    assert s["serving"]["finished_requests"] == 200  # none lost
    assert all(r.finish > 0 and r.generated == r.output for r in out.result.requests)
    assert rep["direction"] == "up" and rep["ranks_before"] == 4 and rep["ranks_after"] == 8
    assert rep["expert_copy_stall_ms"] > 0 and rep["disruption_ms"] == pytest.approx(
        rep["planning_ms"] + rep["expert_copy_stall_ms"] + rep["kv_stall_ms"])
    # the scale step carries the expert copies; requests running across it see the whole disruption
    res = out.result
    assert res.step_s[20] * 1e3 >= rep["expert_copy_stall_ms"]
    t_scale = rep["at_s"]
    spanning = [r for r in res.requests if r.first_token < t_scale < r.finish]
    assert spanning
    gap = max(r.finish - r.first_token for r in spanning) * 1e3
    assert gap >= rep["disruption_ms"]
    assert s["critical_path_ms"]["copy_wait"] == pytest.approx(rep["expert_copy_stall_ms"])
    assert s["critical_path_ms"]["host"] == pytest.approx(5.0)
    # after the event steps are priced by the bigger pool: the plain 8-GPU deployment's table
    plain = _run(rate=400.0, n=200, output=32)
    np.testing.assert_allclose(out.prepared.table_after.a, plain.prepared.table_before.a, rtol=1e-12)
    np.testing.assert_allclose(out.prepared.table_after.b, plain.prepared.table_before.b, rtol=1e-12)


def test_elastic_throughput_after_the_event_matches_the_bigger_pool():
    # every request at once and more than the ranks hold: both runs step at max_num_seqs per rank
    kw = dict(rate=1e6, n=400, output=48, prompt=32,
              batching={"kind": "continuous", "max_num_seqs": 8, "max_batched_tokens": 64})
    el = _run(par={"elastic": {"start_gpus": 4, "at_step": 30}}, **kw)
    big = _run(**kw)
    small = _run(par={"elastic": {"start_gpus": 8, "end_gpus": 4, "at_step": 10 ** 6}}, **kw)

    def rate(res, lo, hi):  # output tokens per second over steps [lo, hi)
        return sum(res.step_samples[lo:hi]) / sum(res.step_s[lo:hi])

    r_after = rate(el.result, 40, 140)
    assert r_after == pytest.approx(rate(big.result, 40, 140), rel=0.05)
    assert r_after > 1.5 * rate(el.result, 5, 30)
    assert small.summary["cluster_serving"]["elastic"] is None  # never reached at_step: no scale


def test_elastic_scale_down_moves_kv_and_loses_no_request():
    el = {"elastic": {"start_gpus": 8, "end_gpus": 4, "at_step": 15}}
    out = _run(rate=400.0, n=120, output=24, par=el)
    s = out.summary
    rep = s["cluster_serving"]["elastic"]
    assert s["serving"]["finished_requests"] == 120
    assert rep["direction"] == "down" and rep["kv_moved_requests"] > 0
    kv_tok = scenario_from_dict(_dict()).model.kv_bytes_per_token
    assert rep["kv_moved_bytes"] % kv_tok == 0 and rep["kv_moved_bytes"] > 0
    assert rep["kv_stall_ms"] > 0
    assert s["transfers"]["bytes_kv_transfer"] == int(rep["kv_moved_bytes"])
    # after the event only ranks 0..3 run anything
    c = out.prepared
    assert all(not r.running and not r.waiting for r in c.rank_scheds[4:])


def test_same_scenario_same_summary():
    a = _run(rate=80.0, n=60).summary
    b = _run(rate=80.0, n=60).summary
    a.pop("wall_time_s")
    b.pop("wall_time_s")
    assert a == b


def test_requests_table_has_a_row_per_finished_request():
    out = _run(rate=80.0, n=30)
    t = out.requests
    assert t.num_rows == 30
    assert set(t.column("request").to_pylist()) == set(range(30))


@pytest.mark.parametrize("name", ["colocated", "afd", "elastic-16to32"])
def test_bundled_deepseek_serving_scenarios_run(name):
    sc = load_scenario(ROOT / "scenarios" / f"deepseek-v3-4x8h100-serving-{name}.yaml", [])
    s = simulate(sc).summary
    sv = s["serving"]
    assert sv["finished_requests"] == sv["requests"]
    assert s["tpot_ms"]["mean"] > 0 and s["ttft_ms"]["mean"] > 0
    if name == "elastic-16to32":
        rep = s["cluster_serving"]["elastic"]
        assert rep["gpus_before"] == 16 and rep["gpus_after"] == 32
        assert rep["tok_s_after"] > rep["tok_s_before"]
