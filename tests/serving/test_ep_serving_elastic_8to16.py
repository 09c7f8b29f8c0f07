"""The bundled elastic scale-up under request load, 8 -> 16 GPUs
(``scenarios/qwen3-30b-a3b-2x8h100-serving-elastic-8to16.yaml``, issue 10's acceptance): the
8-GPU pool is loaded when the event comes, no request is lost, the whole disruption lands in the
scale step (and in the requests running across it), and the 16-GPU pool serves more output tokens
per second afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from tests.conftest import ROOT

SCENARIO = ROOT / "scenarios" / "qwen3-30b-a3b-2x8h100-serving-elastic-8to16.yaml"


@pytest.fixture(scope="module")
def out():
    return simulate(load_scenario(SCENARIO, []))


def test_the_event_is_a_scale_up_from_8_to_16_gpus_at_the_configured_step(out):
    sc = load_scenario(SCENARIO, [])
    rep = out.summary["cluster_serving"]["elastic"]
    assert rep["direction"] == "up"
    assert (rep["gpus_before"], rep["gpus_after"]) == (8, 16)
    assert (rep["ranks_before"], rep["ranks_after"]) == (8, 16)
    assert rep["at_step"] == sc.parallel.elastic.at_step
    assert rep["moved_experts"] > 0 and rep["migration_bytes"] > 0
    # scale-up moves no KV: the running requests keep their ranks
    assert rep["kv_moved_requests"] == 0 and rep["kv_stall_ms"] == 0 and rep["preempted_on_move"] == 0


def test_the_8_gpu_pool_is_under_load_when_the_gpus_join(out):
    res, s = out.result, out.summary
    rep = s["cluster_serving"]["elastic"]
    k = rep["at_step"]
    # requests that arrived before the event and were not yet scheduled: a queue
    queued = [r for r in res.requests if r.arrival < rep["at_s"] < r.first_sched]
    assert len(queued) >= 10
    # the busiest rank ran (nearly) full steps once the ramp-up was over: at most 16 sequences, of
    # which one may be taking a 96-token prompt chunk instead of decoding
    cap = 16 + 96
    assert max(res.step_max_rank_tokens[:k]) <= cap
    assert np.mean(res.step_max_rank_tokens[k // 2:k]) >= 0.9 * cap
    # the offered load (output tokens per second) exceeds what the 8 GPUs delivered before the event
    offered = s["serving"]["arrival_rate_per_s"] * s["tokens"] / s["requests"]
    assert rep["tok_s_before"] < offered


def test_no_request_is_lost(out):
    s, res = out.summary, out.result
    sv = s["serving"]
    assert sv["requests"] == 600 and sv["finished_requests"] == 600
    assert len(res.requests) == 600
    assert all(r.finish >= r.first_token >= r.first_sched >= r.arrival >= 0 for r in res.requests)
    assert all(r.generated == r.output for r in res.requests)
    assert s["tokens"] == sum(r.output for r in res.requests)
    # every output token was produced by exactly one step
    assert sum(res.step_samples) == s["tokens"]


def test_the_disruption_lands_in_the_scale_step(out):
    res, s = out.result, out.summary
    rep = s["cluster_serving"]["elastic"]
    k = rep["at_step"]
    assert rep["disruption_ms"] == pytest.approx(rep["planning_ms"] + rep["expert_copy_stall_ms"] + rep["kv_stall_ms"])
    assert rep["planning_ms"] == pytest.approx(5.0)
    step_ms = np.asarray(res.step_s) * 1e3
    # the planning happens between step k-1's end and step k's start; the expert copies inside step k
    assert res.step_start[k] == pytest.approx(res.step_start[k - 1] + res.step_s[k - 1] + rep["planning_ms"] * 1e-3)
    assert rep["at_s"] == pytest.approx(res.step_start[k - 1] + res.step_s[k - 1])
    assert step_ms[k] >= rep["expert_copy_stall_ms"]
    # and nowhere else: every other step is shorter than the copy stall, and the scale step exceeds
    # the longest ordinary step by at least the stall
    others = np.delete(step_ms, k)
    assert others.max() < rep["expert_copy_stall_ms"]
    assert step_ms[k] - rep["expert_copy_stall_ms"] <= others.max() + 1e-9
    # the requests running across the event see the whole disruption in their latency
    spanning = [r for r in res.requests if r.first_token < rep["at_s"] < r.finish]
    assert spanning
    assert min(r.finish - r.first_token for r in spanning) * 1e3 >= rep["disruption_ms"]
    # the critical path puts the copies and the planning where they belong
    cp = s["critical_path_ms"]
    assert cp["copy_wait"] == pytest.approx(rep["expert_copy_stall_ms"])
    assert cp["host"] == pytest.approx(rep["planning_ms"])


def test_throughput_after_the_event_exceeds_before(out):
    res = out.result
    rep = out.summary["cluster_serving"]["elastic"]
    k = rep["at_step"]
    smp, dur = np.asarray(res.step_samples), np.asarray(res.step_s)
    # the report's figures are the output tokens per second of the steps before / after the scale step
    assert rep["tok_s_before"] == pytest.approx(smp[:k].sum() / dur[:k].sum(), rel=1e-12)
    assert rep["tok_s_after"] == pytest.approx(smp[k + 1:].sum() / dur[k + 1:].sum(), rel=1e-12)
    assert rep["tok_s_after"] > 1.5 * rep["tok_s_before"]
    # a step after the event carries more tokens than one before it (16 ranks instead of 8)
    assert np.mean(res.step_tokens[k + 1:k + 51]) > 1.5 * np.mean(res.step_tokens[k - 50:k])
