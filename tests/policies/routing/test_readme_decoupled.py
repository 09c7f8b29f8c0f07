"""Read-ME router decoupling: one pre-gating decision per token for every layer, known ahead."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.policies.routing.readme_decoupled import ReadMeDecoupled
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "mixtral-8x7b-h100-readme-decoupled-c192.yaml"
SHORT = ["workload.max_tokens=96", "workload.warmup_tokens=0"]


def rm(**kw):
    return ReadMeDecoupled(ReadMeDecoupled.Config(**kw))


def random_routing(seed, T, L, E, K):
    rng = np.random.default_rng(seed)
    ex = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(T)]).astype(np.int16)
    w = -np.sort(-rng.dirichlet(np.ones(K), size=(T, L)), axis=2)
    return ex, w


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), E=st.integers(2, 10), K=st.integers(1, 3), L=st.integers(1, 5),
       decision=st.sampled_from(["first_layer", "vote"]))
def test_every_layer_replays_one_decision_and_the_kept_share_is_exact(seed, E, K, L, decision):
    K = min(K, E)
    ex, w = random_routing(seed, 20, L, E, K)
    anchor = seed % L
    res = rm(decision=decision, anchor=anchor).transform(ex, w, num_experts=E, seed=0)
    out = res.experts
    assert out.shape == (20, L, K)
    assert np.all(out == out[:, :1, :])  # the same experts at every layer
    for row in out[:, 0]:
        real = row[row >= 0]
        assert len(set(real.tolist())) == len(real) >= 1
    np.testing.assert_allclose(res.weights.sum(axis=2), 1.0, rtol=1e-6)
    if decision == "first_layer":
        assert np.array_equal(out[:, 0], ex[:, anchor])
    else:  # brute force of the vote: most gate mass over the row's layers, ties to the lower id
        for t in range(20):
            votes = np.zeros(E)
            for l in range(L):
                for j in range(K):
                    votes[ex[t, l, j]] += w[t, l, j]
            want = sorted(range(E), key=lambda e: (-votes[e], e))[:K]
            assert out[t, 0].tolist() == want
    kept = sum(int(ex[t, l, j] in out[t, l]) for t in range(20) for l in range(L) for j in range(K))
    assert res.stats["kept_choice_share"] == pytest.approx(kept / ex.size)
    mass = sum(w[t, l, j] for t in range(20) for l in range(L) for j in range(K) if ex[t, l, j] in out[t, l])
    assert res.stats["kept_gate_mass_share"] == pytest.approx(mass / w.sum())
    assert res.stats["expert_ids_per_row_after"] == K


def test_decoupled_router_with_pregating_cuts_copy_wait_versus_the_coupled_router():
    coupled = simulate(load_scenario(SC, [*SHORT, "policies.routing.kind=none", "policies.prefetch.kind=none"])).summary
    decoupled_no_pf = simulate(load_scenario(SC, [*SHORT, "policies.prefetch.kind=none"])).summary
    decoupled = simulate(load_scenario(SC, SHORT)).summary
    cw = lambda s: s["critical_path_ms"]["copy_wait"]  # noqa: E731
    assert cw(decoupled) < cw(coupled) and cw(decoupled) < cw(decoupled_no_pf)
    assert decoupled["tpot_ms"]["mean"] < coupled["tpot_ms"]["mean"]
    # the routing known ahead is exactly what the step uses: every prefetch is used, none wasted
    c = decoupled["cache"]
    assert c["prefetch_issued"] > 0 and c["prefetch_used"] == c["prefetch_issued"] and c["prefetch_wasted"] == 0
    assert c["prefetch_precision"] == 1.0
    # the quality proxy is reported, and the layers' working set per token shrinks to one decision
    r = decoupled["routing"]
    assert 0 < r["kept_choice_share"] < 1 and r["pre_gated"] is True
    assert r["expert_ids_per_row_after"] == 2 < r["expert_ids_per_row_before"]
    assert "Read-ME" in decoupled["routing_note"]


def test_bad_anchor_and_k_are_input_errors():
    ex, w = random_routing(0, 4, 3, 8, 2)
    with pytest.raises(InputError, match="anchor 3"):
        rm(anchor=3).transform(ex, w, num_experts=8, seed=0)
    with pytest.raises(InputError, match="k=9"):
        rm(k=9).transform(ex, w, num_experts=8, seed=0)
    # a larger k than the trace's pads with no-expert slots under first_layer
    res = rm(k=3).transform(ex, w, num_experts=8, seed=0)
    assert np.all(res.experts[..., 2] == -1)
