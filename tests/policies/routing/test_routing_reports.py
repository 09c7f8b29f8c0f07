"""Every routing variant reports its effect on bytes moved, compute, cache behaviour and a quality
proxy (issue 10), and runs from a bundled scenario on a bundled trace.

* every registered routing kind has a scenario whose trace is a file under ``traces/``;
* each such scenario's ``summary.json`` has ``routing.effects`` with all four parts, next to the
  run's own ``cache`` and ``transfers``;
* the routing-level figures equal the engine's: with a streaming cache (every expert a step uses
  loaded once per step and layer) over the whole trace, ``cache.accesses`` and
  ``transfers.bytes_h2d_experts`` are exactly ``accesses_after`` and ``streamed_expert_bytes_after``;
* the effects agree with what each policy reports itself (the same quantity computed two ways);
* :func:`routing_effects` and :func:`gate_mass_kept` against brute-force loops (hypothesis).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_raw, load_scenario
from moesim.engine.run import simulate
from moesim.policies.base import load_all_policies, registry
from moesim.policies.routing.base import gate_mass, gate_mass_kept, routing_effects
from tests.conftest import ROOT

SC = ROOT / "scenarios"


def _routing_scenarios() -> dict[str, list[Path]]:
    """Bundled scenarios by routing kind (``policies.routing.kind``)."""
    out: dict[str, list[Path]] = {}
    for p in sorted(SC.glob("*.yaml")):
        kind = ((load_raw(p).get("policies") or {}).get("routing") or {}).get("kind")
        if kind and kind != "none":
            out.setdefault(kind, []).append(p)
    return out


BY_KIND = _routing_scenarios()
FILES = [p for ps in BY_KIND.values() for p in ps]


def _kinds() -> set[str]:
    load_all_policies()
    return set(registry("routing")) - {"none"}


def test_every_routing_kind_has_a_scenario_on_a_bundled_trace():
    kinds = _kinds()
    assert kinds >= {"top_p", "adamoe_null", "moepp_zero", "mc_smoe_merge", "premoe", "readme_decoupled",
                     "adapters", "hmoe", "duo_adaptive", "symbolic_moe"}
    for kind in sorted(kinds):
        assert kind in BY_KIND, f"no bundled scenario uses routing kind {kind}"
        on_file = []
        for p in BY_KIND[kind]:
            sc = load_scenario(p)
            if sc.trace.path is not None:
                path = Path(sc.trace.path)
                path = path if path.is_absolute() else (p.parent / path)
                if path.resolve().is_relative_to((ROOT / "traces").resolve()) and path.exists():
                    on_file.append(p)
        assert on_file, f"routing kind {kind}: no scenario replays a bundled trace file"


def _check_four(e: dict) -> None:
    for part in ("bytes_moved", "compute", "cache", "quality"):
        assert part in e, part
    bm, cp, ca, q = e["bytes_moved"], e["compute"], e["cache"], e["quality"]
    assert bm["streamed_expert_bytes_before"] > 0 and bm["streamed_expert_bytes_after"] >= 0
    assert bm["ratio"] == pytest.approx(bm["streamed_expert_bytes_after"] / bm["streamed_expert_bytes_before"])
    assert cp["expert_choices_before"] > 0 and cp["expert_work_before"] > 0
    assert cp["ratio"] == pytest.approx(cp["expert_work_after"] / cp["expert_work_before"])
    assert ca["accesses_before"] > 0 and ca["working_set_experts_after"] >= 0
    assert ca["working_set_bytes_after"] >= 0
    assert 0.0 <= ca["step_reuse_share_before"] <= 1.0 and 0.0 <= ca["step_reuse_share_after"] <= 1.0
    assert isinstance(q["proxy"], str) and q["value"] is not None and 0.0 <= q["value"] <= 1.0


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_routing_scenario_reports_bytes_compute_cache_and_quality(path):
    s = simulate(load_scenario(path)).summary
    r = s["routing"]
    assert r["policy"] == load_raw(path)["policies"]["routing"]["kind"]
    _check_four(r["effects"])
    assert r["effects"]["step_rows"] == load_scenario(path).workload.batch_size
    # and the run's own figures under the variant
    assert s["cache"]["accesses"] > 0 and s["cache"]["hits"] + s["cache"]["misses"] == s["cache"]["accesses"]
    assert s["transfers"]["bytes_h2d_experts"] >= 0
    # a cached run moves at most what streaming every step's experts would (over the rows it ran)
    assert s["transfers"]["bytes_h2d_experts"] <= r["effects"]["bytes_moved"]["streamed_expert_bytes_after"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_effects_equal_a_streaming_run_over_the_whole_trace(path):
    sc = load_scenario(path)
    B = 1 if sc.policies.routing.kind == "symbolic_moe" else 16  # whole models: one job row per step
    probe = simulate(load_scenario(path, [f"workload.max_tokens={sc.workload.batch_size}",
                                          "workload.warmup_tokens=0"])).summary
    rows = probe["routing"]["effects"]["rows_after"]
    sets = ["policies.cache={kind: streaming}", "policies.prefetch={kind: none}", f"workload.batch_size={B}",
            f"workload.max_tokens={rows}", "workload.warmup_tokens=0"]
    s = simulate(load_scenario(path, sets)).summary
    e = s["routing"]["effects"]
    assert e["step_rows"] == B and e["rows_after"] == rows
    assert s["layer_steps"] == -(-rows // B) * len(sc.model.moe_layers)
    assert s["cache"]["accesses"] == e["cache"]["accesses_after"]
    assert s["cache"]["misses"] == e["cache"]["accesses_after"]
    assert s["transfers"]["bytes_h2d_experts"] == e["bytes_moved"]["streamed_expert_bytes_after"]


# the same quantity computed by the policy and by the shared effects
SELF_CHECKS = {
    "adamoe_null": lambda r, e: (e["quality"]["value"] == pytest.approx(1 - r["dropped_gate_mass_share"])
                                 and e["compute"]["expert_choices_after"] == r["routed_choices"] - r["dropped_choices"]),
    "moepp_zero": lambda r, e: (e["quality"]["value"] == pytest.approx(1 - r["dropped_gate_mass_share"])
                                and e["compute"]["expert_choices_after"] == r["routed_choices"] - r["dropped_choices"]),
    # a renamed choice whose original expert is a dominant the token still uses (at another rank)
    # keeps its mass in the shared measure, not in the policy's renamed share
    "mc_smoe_merge": lambda r, e: (1 - r["renamed_gate_mass_share"] <= e["quality"]["value"] < 1
                                   and e["cache"]["working_set_experts_after"] == sum(r["distinct_experts_per_layer"])),
    "readme_decoupled": lambda r, e: e["quality"]["value"] == pytest.approx(r["kept_gate_mass_share"]),
    "top_p": lambda r, e: (e["compute"]["expert_choices_after"] == r["routed_choices_after"]
                           and e["quality"]["value"] == r["gate_mass_kept_share"]),
    "duo_adaptive": lambda r, e: (e["compute"]["expert_choices_after"] == r["routed_choices_after"]
                                  and (e["step_rows"] != 1 or e["bytes_moved"]["streamed_expert_bytes_after"]
                                       == r["streamed_bytes_after"])),
    "hmoe": lambda r, e: (e["compute"]["ratio"] == pytest.approx(r["expert_compute_ratio_per_choice"])
                          and e["cache"]["accesses_after"] == e["cache"]["accesses_before"]),
    "premoe": lambda r, e: (e["quality"]["value"] == r["gate_mass_kept_share"]
                            and e["cache"]["working_set_experts_after"]
                            == e["cache"]["working_set_experts_before"] - r["pruned_experts"]),
    "adapters": lambda r, e: (e["cache"]["working_set_experts_after"] / 32 == pytest.approx(r["working_set_per_layer_after"])
                              and e["compute"]["expert_choices_after"] == r["routed_choices"]),
    "symbolic_moe": lambda r, e: (e["quality"]["proxy"] == "skill_vote_coverage"
                                  and e["quality"]["value"] == r["skill_vote_coverage"]
                                  and e["compute"]["expert_choices_after"] == e["rows_after"]),
}


@pytest.mark.parametrize("kind", sorted(SELF_CHECKS))
def test_effects_agree_with_the_policy_own_report(kind):
    path = BY_KIND[kind][0]
    sc = load_scenario(path)
    r = simulate(load_scenario(path, [f"workload.max_tokens={sc.workload.batch_size}",
                                      "workload.warmup_tokens=0"])).summary["routing"]
    assert SELF_CHECKS[kind](r, r["effects"])


def test_quality_proxies_order_as_the_variants_drop_more():
    # more null experts (a higher threshold) keep less gate mass and move fewer streamed bytes
    path = BY_KIND["adamoe_null"][0]
    q, b = [], []
    for th in (0.1, 0.3, 0.45):
        e = simulate(load_scenario(path, [f"policies.routing.threshold={th}", "workload.max_tokens=8",
                                          "workload.warmup_tokens=0"])).summary["routing"]["effects"]
        q.append(e["quality"]["value"])
        b.append(e["bytes_moved"]["streamed_expert_bytes_after"])
    assert q[0] >= q[1] >= q[2] and q[0] > q[2]
    assert b[0] >= b[1] >= b[2] and b[0] > b[2]


# ----- the helpers against brute force ---------------------------------------------------------------

def _brute(ex, size, step_rows, eb):
    T, L, K = ex.shape
    steps = [range(s, min(s + step_rows, T)) for s in range(0, T, step_rows)]
    acc, streamed, reuse, later, prev = 0, 0.0, 0, 0, None
    for rs in steps:
        cur = set()
        for t in rs:
            for l in range(L):
                for k in range(K):
                    if ex[t, l, k] >= 0:
                        cur.add((l, int(ex[t, l, k])))
        acc += len(cur)
        streamed += sum(size[l, e] for l, e in cur) * eb
        if prev is not None:
            later += len(cur)
            reuse += len(cur & prev)
        prev = cur
    ws = {(l, int(ex[t, l, k])) for t in range(T) for l in range(L) for k in range(K) if ex[t, l, k] >= 0}
    work = sum(size[l, ex[t, l, k]] for t in range(T) for l in range(L) for k in range(K) if ex[t, l, k] >= 0)
    return {"accesses": acc, "streamed": round(streamed), "ws": len(ws),
            "ws_bytes": round(sum(size[l, e] for l, e in ws) * eb), "work": work,
            "reuse": reuse / later if later else 0.0, "choices": int((ex >= 0).sum())}


routings = st.integers(1, 12).flatmap(lambda T: st.integers(1, 3).flatmap(lambda L: st.integers(1, 3).flatmap(
    lambda K: st.lists(st.integers(-1, 5), min_size=T * L * K, max_size=T * L * K).map(
        lambda v: np.array(v, dtype=np.int16).reshape(T, L, K)))))


@settings(max_examples=60, deadline=None)
@given(before=routings, data=st.data())
def test_routing_effects_equal_a_brute_force_count(before, data):
    L = before.shape[1]
    E = 6
    after = np.array(data.draw(st.lists(st.integers(-1, E - 1), min_size=before.size, max_size=before.size)),
                     dtype=np.int16).reshape(before.shape)
    step_rows = data.draw(st.integers(1, 4))
    size = np.array(data.draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=L * E, max_size=L * E))).reshape(L, E)
    eb = 1000
    e = routing_effects(before, after, num_experts=E, size_after=size, expert_bytes=eb, step_rows=step_rows)
    rb = _brute(before, np.ones((L, E)), step_rows, eb)
    ra = _brute(after, size, step_rows, eb)
    for side, ref in (("before", rb), ("after", ra)):
        assert e["cache"][f"accesses_{side}"] == ref["accesses"]
        assert e["bytes_moved"][f"streamed_expert_bytes_{side}"] == ref["streamed"]
        assert e["cache"][f"working_set_experts_{side}"] == ref["ws"]
        assert e["cache"][f"working_set_bytes_{side}"] == ref["ws_bytes"]
        assert e["cache"][f"step_reuse_share_{side}"] == pytest.approx(ref["reuse"])
        assert e["compute"][f"expert_work_{side}"] == pytest.approx(ref["work"])
        assert e["compute"][f"expert_choices_{side}"] == ref["choices"]


@settings(max_examples=60, deadline=None)
@given(before=routings, data=st.data())
def test_gate_mass_kept_equals_a_brute_force_sum(before, data):
    T, L, K = before.shape
    after = np.array(data.draw(st.lists(st.integers(-1, 5), min_size=before.size, max_size=before.size)),
                     dtype=np.int16).reshape(before.shape)
    w = np.array(data.draw(st.lists(st.floats(0.01, 1.0), min_size=before.size, max_size=before.size))).reshape(before.shape)
    mass = gate_mass(before, w)
    kept = tot = 0.0
    for t in range(T):
        for l in range(L):
            for k in range(K):
                if before[t, l, k] >= 0:
                    tot += mass[t, l, k]
                    if before[t, l, k] in after[t, l].tolist():
                        kept += mass[t, l, k]
    assert gate_mass_kept(before, w, after) == pytest.approx(kept / tot if tot else 1.0)
    # unchanged routing keeps everything; all dropped keeps nothing
    assert gate_mass_kept(before, w, before) == 1.0
    if (before >= 0).any():
        assert gate_mass_kept(before, w, np.full_like(before, -1)) == 0.0
