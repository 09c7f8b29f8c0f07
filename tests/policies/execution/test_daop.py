"""DAOP: the swap rule against a brute-force reference, the engine's placement against a replay of
the rule by hand on a tiny trace, and the paper's claims on Mixtral with a stable per-sequence
routing pattern."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario, scenario_from_dict
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.policies.execution.daop import swap_plan
from moesim.traces import Trace, save_trace
from tests.conftest import ROOT, TINY_HW, TINY_MODEL


def brute_swaps(counts, on_gpu, k, ratio):
    """The rule written differently: rank every expert against all others by pairwise comparison."""
    E = len(counts)
    cpu = [e for e in range(E) if not on_gpu[e]]
    gpu = [e for e in range(E) if on_gpu[e]]
    hot_rank = {e: sum(1 for o in cpu if counts[o] > counts[e] or (counts[o] == counts[e] and o < e)) for e in cpu}
    cold_rank = {e: sum(1 for o in gpu if counts[o] < counts[e] or (counts[o] == counts[e] and o < e)) for e in gpu}
    out = []
    for i in range(k):
        h = [e for e in cpu if hot_rank[e] == i]
        c = [e for e in gpu if cold_rank[e] == i]
        if h and c and counts[h[0]] > ratio * counts[c[0]]:
            out.append((h[0], c[0]))
    return out


@settings(max_examples=400, deadline=None)
@given(data=st.data(), E=st.integers(1, 12), k=st.integers(1, 6), ratio=st.sampled_from([1.0, 1.05, 2.0]))
def test_swap_rule_matches_brute_force(data, E, k, ratio):
    counts = data.draw(st.lists(st.integers(0, 6), min_size=E, max_size=E))
    on_gpu = data.draw(st.lists(st.booleans(), min_size=E, max_size=E))
    got = swap_plan(counts, on_gpu, k, ratio)
    assert got == brute_swaps(counts, on_gpu, k, ratio)
    assert all(not on_gpu[h] and on_gpu[c] for h, c in got)


def tiny_scenario(trace_path, **daop) -> dict:
    return {
        "name": "tiny-daop",
        "seed": 3,
        "model": copy.deepcopy(TINY_MODEL),
        "hardware": copy.deepcopy(TINY_HW),
        "trace": {"path": str(trace_path)},
        "policies": {
            "cache": {"kind": "lru", "capacity_experts": 2, "scope": "per_layer", "warm_start": {0: [0], 1: [0]}},
            "execution": {"kind": "daop", "sequence_steps": 6, "profile_steps": 2, "first_predict_layer": 1, **daop},
        },
        "workload": {"batch_size": 1, "max_tokens": 30, "warmup_tokens": 0, "context_tokens": 0},
    }


def test_engine_placement_equals_the_rule_replayed_by_hand(tmp_path):
    # tiny model: 2 MoE layers, 4 experts, top-1, one GPU slot per layer (expert 0 at start)
    rng = np.random.default_rng(7)
    x = rng.choice(4, size=(30, 2, 1), p=[0.1, 0.2, 0.3, 0.4]).astype(np.int16)
    path = tmp_path / "t.npz"
    save_trace(Trace(experts=x, meta={"model": "tiny-moe", "num_experts": 4, "layers": [0, 1]}), path)
    out = simulate(scenario_from_dict(tiny_scenario(path)))
    s = out.summary
    # the reference: per layer the GPU set, per sequence the counts of its first 2 steps
    gpu = [{0}, {0}]
    counts = np.zeros((2, 4), int)
    cpu = [0, 0]
    swaps = 0
    for step in range(30):
        pos = step % 6
        if pos == 0:
            counts[:] = 0
        for c in range(2):
            if pos == 2:
                for h, cold in brute_swaps(counts[c].tolist(), [e in gpu[c] for e in range(4)], 4, 1.05):
                    gpu[c] = (gpu[c] - {cold}) | {h}
                    swaps += 1
            e = int(x[step, c, 0])
            if pos < 2:
                counts[c, e] += 1
            cpu[c] += e not in gpu[c]
    assert s["execution"]["cpu_gpu_swaps"] == swaps > 0
    assert s["transfers"]["copies"] == swaps  # a swap is the only weight copy DAOP makes
    assert [p["cpu_executed"] for p in s["per_layer"]] == cpu
    assert s["cache"]["hits"] == 60 - sum(cpu)
    assert {k for k in out.prepared.engine.cache.resident} == {c * 4 + e for c in range(2) for e in gpu[c]}


def test_bad_profile_window_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="profile_steps"):
        scenario_from_dict(tiny_scenario(tmp_path / "x.npz", profile_steps=6))


# ----- the paper's claims on Mixtral-8x7B / H100 -----------------------------------------------------
SEQ = 32


def stable_trace(path, sequences=6, stick=0.9, seed=0):
    """Mixtral routing where each sequence has its own two experts per layer (kept by each token
    with probability ``stick``, else a random other expert): a stable per-sequence pattern that
    no global popularity ranking captures."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(sequences):
        fav = np.array([rng.choice(8, 2, replace=False) for _ in range(32)])  # [L, 2]
        for _ in range(SEQ):
            row = fav.copy()
            for l in range(32):
                for r in range(2):
                    if rng.random() > stick:
                        row[l, r] = rng.choice([e for e in range(8) if e not in row[l]])
            rows.append(row)
    x = np.asarray(rows, dtype=np.int16)
    save_trace(Trace(experts=x, meta={"model": "mixtral-8x7b", "num_experts": 8, "top_k": 2,
                                      "layers": list(range(32))}), path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("daop") / "stable.npz"
    stable_trace(path)
    sc = ROOT / "scenarios" / "mixtral-8x7b-h100-daop-c96.yaml"
    base = [f"trace.path={path}", f"workload.max_tokens={6 * SEQ}", "workload.warmup_tokens=0",
            "policies.cache.capacity_experts=64"]
    dp = [f"policies.execution.sequence_steps={SEQ}", "policies.execution.profile_steps=4"]
    out = {}
    for name, sets in {
        "daop": dp,
        "daop_no_precalc": [*dp, "policies.execution.first_predict_layer=32"],
        "daop_wrong": [*dp, "policies.execution.precalc_accuracy=0"],
        "fiddler": ["policies.execution.kind=fiddler"],
        "lru": ["policies.execution.kind=gpu_only"],
    }.items():
        out[name] = simulate(load_scenario(sc, [*base, *sets])).summary
    return out


def test_daop_beats_fiddler_when_the_per_sequence_pattern_is_stable(runs):
    d, f = runs["daop"], runs["fiddler"]
    # per-sequence swaps put each sequence's experts on the GPU: far fewer CPU experts
    assert d["cache"]["cpu_executed"] < 0.5 * f["cache"]["cpu_executed"]
    assert d["tpot_ms"]["mean"] < f["tpot_ms"]["mean"]


def test_daop_moves_fewer_experts_than_an_lru_cache(runs):
    d, lru = runs["daop"], runs["lru"]
    swaps = d["execution"]["cpu_gpu_swaps"]
    # at most `swap_candidates` (4, but only 2 GPU slots per layer) per layer per sequence
    assert 0 < swaps <= 6 * 32 * 2
    assert d["transfers"]["copies"] == swaps
    assert swaps < 0.5 * lru["transfers"]["copies"]


def test_precalculation_hides_cpu_work_and_wrong_guesses_cost_it(runs):
    d, no, wrong = runs["daop"], runs["daop_no_precalc"], runs["daop_wrong"]
    assert no["execution"]["precalc_experts"] == 0
    assert d["execution"]["precalc_experts"] > 0 and d["execution"]["precalc_wasted"] == 0
    # every CPU expert of layers >= 5 was pre-calculated (accuracy 1) ...
    late = sum(p["cpu_executed"] for p in d["per_layer"] if p["layer"] >= 5)
    assert d["execution"]["precalc_experts"] == late
    # ... or, at accuracy 0, guessed wrong: the same number of wasted CPU experts
    late_w = sum(p["cpu_executed"] for p in wrong["per_layer"] if p["layer"] >= 5)
    assert wrong["execution"]["precalc_wasted"] == late_w and wrong["execution"]["precalc_experts"] == 0
    assert d["tpot_ms"]["mean"] < no["tpot_ms"]["mean"] < wrong["tpot_ms"]["mean"]


def test_precalculation_starts_at_a_model_layer_not_a_column():
    # a trace logging model layers 0, 4, 6, 8 only: column 2 is model layer 6, past layer 5
    from moesim.policies.cache.base import CacheSetup
    from moesim.policies.execution.daop import Daop

    setup = CacheSetup(num_columns=4, num_experts=8, expert_bytes=1, top_k=2, model_layers=(0, 4, 6, 8),
                       max_distinct_per_step=2)
    pol = Daop(Daop.Config(first_predict_layer=5), setup)
    assert [pol.precalc(c, {1, 3}, {1: 1, 3: 1})[0] for c in range(4)] == [set(), set(), {1, 3}, {1, 3}]
