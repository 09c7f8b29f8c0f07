"""Disaggregated prefill/decode: a lone request's latency is the sum of its parts, KV bytes are
prompt x KV bytes per token, pools never hold more than they may, load makes requests wait."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.config.loader import scenario_from_dict
from moesim.engine.run import simulate
from moesim.errors import InputError


def _scenario(rate=None, n=1, prompt=96, output=6, batch=4):
    arrival = {"kind": "poisson", "rate_per_s": rate} if rate else {"kind": "poisson", "rate_per_s": 1.0}
    return scenario_from_dict({
        "name": "pd-test",
        "model": {"preset": "mixtral-8x7b"},
        "hardware": {"preset": "h100-sxm-pcie5"},
        "cluster": {"preset": "dgx-h100", "nodes": 2, "gpus_per_node": 4, "nic": {"nics_per_node": 4}},
        "parallel": {"prefill_gpus": 4},
        "trace": {"synthetic": {"tokens": 512, "zipf_s": 0.8, "reuse_prob": 0.2, "seed": 1}},
        "workload": {"batch_size": batch, "context_tokens": 256, "requests": {
            "arrival": arrival, "num_requests": n, "prompt_tokens": prompt, "output_tokens": output}},
        "runtime": {"launch_mode": "graph", "wait_for_router": False},
        "policies": {"cache": {"kind": "all_resident"}, "placement": {"kind": "contiguous"},
                     "alltoall": {"kind": "direct"}},
    })


def test_a_lone_request_is_prefill_plus_kv_move_plus_decode_steps():
    sc = _scenario(n=1, prompt=96, output=6)
    out = simulate(sc)
    s, tables, res = out.summary, out.prepared, out.result
    r = res.requests[0]
    assert r.prefill_start == pytest.approx(r.arrival)  # nothing queued ahead
    assert r.first_token - r.prefill_start == pytest.approx(tables.prefill(96))
    kv = 96 * sc.model.kv_bytes_per_token
    assert s["transfers"]["bytes_network"] == kv
    assert r.kv_ready - r.first_token == pytest.approx(res.kv_transfer_s[0])
    assert r.finish - r.decode_start == pytest.approx(5 * tables.decode(1))  # 6 tokens: 1 from prefill
    assert s["ttft_ms"]["mean"] == pytest.approx((r.first_token - r.arrival) * 1e3)


def test_load_queues_requests_and_pools_stay_within_their_capacity():
    lo = simulate(_scenario(rate=2.0, n=40)).result
    hi = simulate(_scenario(rate=400.0, n=40)).result
    wait = lambda res: np.mean([r.prefill_start - r.arrival for r in res.requests])  # noqa: E731
    assert wait(hi) > wait(lo)
    assert max(hi.decode_occupancy) <= 4 * 4  # decode GPUs x batch_size
    assert all(r.finish >= r.kv_ready >= r.first_token >= r.prefill_start >= r.arrival for r in hi.requests)
    assert all(r.tokens == r.output for r in hi.requests)


def test_in_system_time_average_matches_requests_times_mean_latency():
    out = simulate(_scenario(rate=50.0, n=60))
    s = out.summary
    window = s["measured_time_s"]
    n = s["serving"]["finished_requests"]
    # Little's law over the whole run (it starts and ends empty): L = (N / T) x W
    assert s["serving"]["mean_in_system"] == pytest.approx(n / window * s["serving"]["mean_e2e_s"], rel=1e-9)


def test_serving_on_a_cluster_without_prefill_gpus_is_co_located():
    # no longer refused: co-located serving (moesim.serving.ep_serving, tests/serving/test_ep_serving.py)
    sc = scenario_from_dict({
        "name": "x", "model": {"preset": "mixtral-8x7b"}, "hardware": {"preset": "h100-sxm-pcie5"},
        "cluster": {"preset": "dgx-h100"}, "trace": {"synthetic": {"tokens": 64}},
        "workload": {"requests": {"arrival": {"kind": "poisson", "rate_per_s": 1.0}, "num_requests": 2}},
        "policies": {"cache": {"kind": "all_resident"}},
    })
    assert sc.parallel.prefill_gpus is None and sc.policies.batching.kind == "continuous"
    with pytest.raises(InputError, match="prefill_gpus"):
        simulate(scenario_from_dict({**_scenario().model_dump(mode="json"),
                                     "parallel": {"prefill_gpus": 8}}))


@pytest.mark.parametrize("extra", [{"attention_gpus": 2}, {"elastic": {"start_gpus": 6, "at_step": 2}}])
def test_prefill_gpus_with_afd_or_elastic_is_refused_in_one_line(extra):
    sc = scenario_from_dict({**_scenario().model_dump(mode="json"), "parallel": {"prefill_gpus": 4, **extra}})
    with pytest.raises(InputError, match=r"parallel\.(attention_gpus|elastic): is not modelled together "
                                         r"with parallel\.prefill_gpus") as ei:
        simulate(sc)
    assert "\n" not in str(ei.value)


def test_a_pool_of_partial_nodes_is_refused_in_one_line():
    # 2 nodes of 4: prefill 2 GPUs (part of one node) is fine, but 3 prefill GPUs leave a 5-GPU
    # decode pool that is neither part of a node nor whole nodes
    sc = scenario_from_dict({**_scenario().model_dump(mode="json"), "parallel": {"prefill_gpus": 3}})
    with pytest.raises(InputError, match=r"parallel: a pool of 5 GPUs is neither part of one node nor whole "
                                         r"nodes of 4 GPUs") as ei:
        simulate(sc)
    assert "\n" not in str(ei.value)


def test_warmup_requests_leave_the_throughput_window():
    d = _scenario(rate=50.0, n=6).model_dump(mode="json")
    d["workload"]["requests"]["warmup_requests"] = 2
    s = simulate(scenario_from_dict(d)).summary
    assert 0 < s["measured_time_s"] < s["sim_time_s"]
    assert s["throughput_tok_s"] * s["measured_time_s"] == pytest.approx(s["serving"]["output_tokens"])
    cp = s["critical_path_ms"]
    assert sum(v for k, v in cp.items() if k != "total") == pytest.approx(cp["total"])
