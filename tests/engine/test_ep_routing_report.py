"""Routing variants on expert-parallel runs: the EP summary reports the same ``routing`` block as the
single-GPU one (policy, the transform's stats, ``effects`` in steps of the EP step's rows), and the
all-to-all traffic follows the transformed routing exactly (brute-force send counts)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.config.loader import scenario_from_dict
from moesim.engine.run import simulate
from moesim.metrics.summary import routing_block
from moesim.policies.alltoall.base import token_bytes
from moesim.policies.routing.base import routing_effects
from moesim.traces.format import Trace, save_trace

G, B, E = 4, 2, 8  # GPUs, sequences per GPU, Mixtral-8x7B experts (contiguous: expert e on GPU e // 2)
R = G * B  # trace rows of one EP decode step
T = 8 * R  # eight steps, all measured
FOUR_GPU = {
    "name": "four-gpu",
    "nodes": 1,
    "gpus_per_node": G,
    "intra": {"kind": "nvswitch", "gpu_bandwidth_gb_s": 100.0, "latency_us": 1.0, "p2p": True},
    "nic": None,
    "fabric": {"kind": "none", "switch_latency_us": 0.0, "oversubscription": 1.0},
    "host_link_gb_s": 25.0,
}


def _run(tmp_path, experts, routing=None, name="t.npz"):
    experts = np.asarray(experts, dtype=np.int16)
    meta = {"format_version": 1, "model": "mixtral-8x7b", "num_experts": E, "top_k": experts.shape[2],
            "layers": [0], "source": "test", "licence": "CC0"}
    p = tmp_path / name
    save_trace(Trace(experts=experts, meta=meta), p)
    d = {
        "name": "ep-routing",
        "model": {"preset": "mixtral-8x7b"},
        "hardware": {"preset": "h100-sxm-pcie5"},
        "cluster": copy.deepcopy(FOUR_GPU),
        "trace": {"path": str(p), "layers": [0]},  # every MoE layer replays the one column
        "workload": {"batch_size": B, "max_tokens": T, "warmup_tokens": 0, "context_tokens": 16},
        "runtime": {"launch_mode": "graph", "wait_for_router": False},
        "policies": {"cache": {"kind": "all_resident"}, "placement": {"kind": "contiguous"},
                     "alltoall": {"kind": "direct"}, **({"routing": routing} if routing else {})},
    }
    return simulate(scenario_from_dict(d))


def _remote_sends(experts) -> int:
    """Brute force: (row, destination GPU) pairs over the trace's one column, a destination being a
    GPU other than the row's own that serves any of the row's experts (direct all-to-all sends a
    token once to each such GPU)."""
    n = 0
    for t in range(experts.shape[0]):
        home = (t % R) // B
        n += len({int(e) // (E // G) for e in experts[t, 0] if e >= 0} - {home})
    return n


def _random_trace(seed: int, remote_only: bool) -> np.ndarray:
    """``[T, 1, 2]`` routing; with ``remote_only`` every row's two experts sit on two different GPUs,
    neither the row's own, so each choice is one send of its own."""
    rng = np.random.default_rng(seed)
    out = np.empty((T, 1, 2), dtype=np.int16)
    for t in range(T):
        home = (t % R) // B
        if remote_only:
            g = rng.choice([x for x in range(G) if x != home], size=2, replace=False)
            out[t, 0] = g * (E // G) + rng.integers(0, E // G, size=2)
        else:
            out[t, 0] = rng.choice(E, size=2, replace=False)
    return out


@pytest.mark.parametrize("share", [0.2, 0.5])
def test_zero_computation_experts_cut_ep_traffic_by_exactly_their_share(tmp_path, share):
    ex = _random_trace(3, remote_only=True)
    base = _run(tmp_path, ex).summary
    out = _run(tmp_path, ex, {"kind": "moepp_zero", "zero_share": share}, name="z.npz")
    s = out.summary
    L = len(out.prepared.model_layers)
    r = s["routing"]
    assert r["policy"] == "moepp_zero"
    routed, dropped = r["routed_choices"], r["dropped_choices"]
    assert routed == T * 2 and 0 < dropped < routed
    # every choice was one send: traffic falls by exactly the share of choices the zero experts took
    a_b, a_s = base["expert_parallel"]["alltoall"], s["expert_parallel"]["alltoall"]
    assert a_b["remote_sends"] == routed * L
    assert a_s["remote_sends"] == (routed - dropped) * L
    t_b, t_s = base["expert_parallel"]["traffic"], s["expert_parallel"]["traffic"]
    for key in ("dispatched_bytes", "combined_bytes", "total_bytes"):
        assert t_s[key] == pytest.approx(t_b[key] * (1 - r["dropped_share"]), rel=1e-12)
    assert s["transfers"]["bytes_intra_node"] == round(t_s["total_bytes"])
    # the effects: choices and work fall likewise; steps are the EP step's rows (every rank's batch)
    eff = r["effects"]
    assert eff["step_rows"] == R == s["expert_parallel"]["tokens_per_step"]
    assert eff["compute"]["expert_choices_before"] == routed
    assert eff["compute"]["expert_choices_after"] == routed - dropped
    assert eff["compute"]["ratio"] == pytest.approx(1 - r["dropped_share"])
    assert eff["quality"]["proxy"] == "gate_mass_kept_share"
    assert eff["quality"]["value"] == pytest.approx(1 - r["dropped_gate_mass_share"])
    assert "moepp_zero" in s["routing_note"]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), share=st.sampled_from([0.1, 0.3, 0.6]))
def test_ep_sends_match_brute_force_on_transformed_routing(tmp_path, seed, share):
    # local choices and several choices to one GPU: sends fall only where a GPU is no longer needed
    ex = _random_trace(seed, remote_only=False)
    base = _run(tmp_path, ex).summary
    out = _run(tmp_path, ex, {"kind": "moepp_zero", "zero_share": share}, name="z.npz")
    after = np.asarray(out.prepared.trace.experts)
    L = len(out.prepared.model_layers)
    sends_b, sends_a = _remote_sends(ex), _remote_sends(after)
    assert base["expert_parallel"]["alltoall"]["remote_sends"] == sends_b * L
    assert out.summary["expert_parallel"]["alltoall"]["remote_sends"] == sends_a * L
    assert sends_a <= sends_b
    hidden = out.prepared.scenario.model.hidden_size
    assert out.summary["expert_parallel"]["traffic"]["dispatched_bytes"] == pytest.approx(
        sends_a * L * token_bytes(hidden, "bf16"))
    # the reported effects are those of the routing before vs after, in steps of R rows
    eff = out.summary["routing"]["effects"]
    ref = routing_effects(ex, after, num_experts=E, expert_bytes=out.prepared.scenario.model.expert_bytes,
                          step_rows=R)
    for k in ("bytes_moved", "compute", "cache"):
        assert eff[k] == ref[k]


def test_ep_routing_block_is_the_shared_one(tmp_path):
    ex = _random_trace(5, remote_only=False)
    plain = _run(tmp_path, ex)
    assert plain.summary["routing"] == {"policy": "none"}
    out = _run(tmp_path, ex, {"kind": "moepp_zero", "zero_share": 0.25}, name="z.npz")
    assert out.summary["routing"] == routing_block(out.prepared.scenario, out.prepared.trace)
    assert set(out.summary["routing"]) >= {"policy", "routed_choices", "dropped_share", "effects"}
