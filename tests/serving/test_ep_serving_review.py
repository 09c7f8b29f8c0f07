"""Review fixes in co-located cluster serving (moesim.serving.ep_serving).

An elastic scale event that comes while the pool sits idle (no request to run at ``at_step``):
the expert copies it starts still have to finish before the new deployment's first step, and the
critical path books only the part of the copies that step waited for. Before the fix the copy
stall was dropped (the next step ran at once on GPUs whose experts had not arrived) while the
summary still subtracted it from ``gpu_compute``, which came out negative."""

from __future__ import annotations

import pytest

from moesim.config.loader import scenario_from_dict
from moesim.engine.run import simulate
from tests.serving.test_ep_serving import _dict

# 2 requests/s against ~10 ms steps: the first request's 6 steps end long before the second arrives
EL = {"elastic": {"start_gpus": 4, "at_step": 6, "planning_ms": 1.0}}


@pytest.fixture(scope="module")
def out():
    return simulate(scenario_from_dict(_dict(rate=2.0, n=4, output=6, par=EL)))


def test_scale_event_on_an_idle_pool_still_waits_for_the_expert_copies(out):
    res, rep = out.result, out.summary["cluster_serving"]["elastic"]
    k = rep["at_step"]
    copies_start = rep["at_s"] + (rep["planning_ms"] + rep["kv_stall_ms"]) * 1e-3
    copies_end = copies_start + rep["expert_copy_stall_ms"] * 1e-3
    # the precondition: the pool was idle when the event came, and work arrived before the copies ended
    assert res.step_start[k] > copies_start
    assert res.step_start[k] < copies_end
    # the first step on the new deployment ends no earlier than its copies plus its own work
    assert res.step_start[k] + res.step_s[k] >= copies_end
    # steps after it are ordinary again
    assert max(res.step_s[k + 1:]) < rep["expert_copy_stall_ms"] * 1e-3
    # every request still finishes, and those served after the event waited for the copies
    assert all(r.finish > 0 and r.generated == r.output for r in res.requests)
    assert all(r.first_token >= copies_end for r in res.requests if r.arrival > rep["at_s"])


def test_critical_path_books_only_the_copy_wait_inside_the_step(out):
    res, s = out.result, out.summary
    rep = s["cluster_serving"]["elastic"]
    k = rep["at_step"]
    copies_end = rep["at_s"] + (rep["planning_ms"] + rep["kv_stall_ms"] + rep["expert_copy_stall_ms"]) * 1e-3
    waited = copies_end - res.step_start[k]  # what step k spent waiting for the copies
    cp = s["critical_path_ms"]
    assert cp["copy_wait"] == pytest.approx((waited + rep["kv_stall_ms"] * 1e-3) * 1e3, rel=1e-9)
    assert cp["copy_wait"] < rep["expert_copy_stall_ms"]  # part of the copies overlapped the idle gap
    assert cp["gpu_compute"] == pytest.approx((sum(res.step_s) - waited) * 1e3, rel=1e-9)
    assert cp["gpu_compute"] > 0
    parts = ("gpu_compute", "copy_wait", "host", "cpu_expert", "comm", "idle")
    assert sum(cp[p] for p in parts) == pytest.approx(cp["total"], rel=1e-9)
