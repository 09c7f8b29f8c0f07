"""Look-ahead from the router distribution: the fitted maps against brute-force sums and the normal
equations; predictions are the top-k of the summed scores; a trace whose probs carry the next
layer's routing is predicted perfectly; online learning uses only the past; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.plan import build_plan
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.policies.prefetch.base import PrefetchSetup
from moesim.policies.prefetch.probs_lookahead import ProbsLookahead, fit_map, multi_hot
from moesim.traces import Trace, load_trace, save_trace
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96-probs-lookahead.yaml"


def _random(seed, T=120, C=3, E=6, K=2):
    rng = np.random.default_rng(seed)
    ex = np.stack([rng.choice(E, size=K, replace=False) for _ in range(T * C)]).reshape(T, C, K).astype(np.int16)
    probs = rng.dirichlet(np.ones(E), size=(T, C)).astype(np.float16)
    return ex, probs


def _setup(ex, probs, max_tokens, batch=1):
    T, C, K = ex.shape
    plan = build_plan(ex, batch_size=batch, max_tokens=max_tokens, loop_trace=False)
    return PrefetchSetup(num_columns=C, num_experts=probs.shape[2], top_k=K, plan=plan, col_src=tuple(range(C)),
                         experts=ex, batch_size=batch, seed=0, trace=Trace(experts=ex, probs=probs))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), batch=st.sampled_from([1, 3]), fit=st.sampled_from(["least_squares", "cooccurrence"]))
def test_held_out_maps_and_predictions_brute_force(seed, batch, fit):
    ex, probs = _random(seed)
    T, C, K = ex.shape
    E = probs.shape[2]
    su = _setup(ex, probs, max_tokens=30, batch=batch)
    pol = ProbsLookahead(ProbsLookahead.Config(fit=fit, min_train_rows=10), su)
    start = su.plan.rows_used
    assert pol.train_rows == T - start
    for c in range(C - 1):
        x = probs[start:, c].astype(np.float64)
        y = np.zeros((T - start, E))
        for i, row in enumerate(ex[start:, c + 1]):
            for e in row:
                y[i, e] = 1.0
        W = pol.maps[c]
        if fit == "cooccurrence":  # sum over rows of p_i * [j chosen]
            ref = np.zeros((E, E))
            for i in range(T - start):
                for a in range(E):
                    for b in range(E):
                        ref[a, b] += x[i, a] * y[i, b]
            np.testing.assert_allclose(W, ref, rtol=1e-12, atol=1e-12)
        else:  # ridge normal equations: (x'x + lam I) W = x'y
            lam = 1e-3 * np.trace(x.T @ x) / E
            np.testing.assert_allclose((x.T @ x + lam * np.eye(E)) @ W, x.T @ y, rtol=1e-9, atol=1e-9)
    for s in range(su.plan.steps):
        rows = range(s * batch, s * batch + batch)
        for c in range(C - 1):
            score = sum(probs[r, c].astype(np.float64) @ pol.maps[c] for r in rows)
            order = sorted(range(E), key=lambda e: (-score[e], e))[: K * batch]
            if fit == "cooccurrence":
                order = [e for e in order if score[e] > 0]
            assert pol.plan(s, c, su.true_row(s, c)) == [(c + 1, e) for e in order]
        assert pol.plan(s, C - 1, su.true_row(s, C - 1)) == []


def test_least_squares_without_ridge_is_the_least_squares_solution():
    rng = np.random.default_rng(1)
    x = rng.random((50, 4))
    y = rng.random((50, 4))
    W = fit_map(x, y, "least_squares", 0.0)
    np.testing.assert_allclose(x.T @ (x @ W - y), 0.0, atol=1e-10)  # residual orthogonal to x
    assert np.array_equal(multi_hot(np.array([[1, -1], [0, 2]]), 3), [[0, 1, 0], [1, 0, 1]])


def _informative(path, T=400, L=32, seed=0):
    """Random routing whose probs at layer l are the next layer's choices (halved): a perfect
    predictor exists, so the learnt map must find it."""
    rng = np.random.default_rng(seed)
    ex = np.stack([rng.choice(8, size=2, replace=False) for _ in range(T * L)]).reshape(T, L, 2).astype(np.int16)
    probs = np.full((T, L, 8), 0.0, np.float32)
    for t in range(T):
        for c in range(L - 1):
            probs[t, c, ex[t, c + 1]] = 0.5
        probs[t, L - 1] = 1 / 8
    tr = Trace(experts=ex, probs=probs.astype(np.float16),
               meta={"num_experts": 8, "top_k": 2, "layers": list(range(L)), "model": "mixtral-8x7b"})
    return save_trace(tr, path)


@pytest.mark.parametrize("fit", ["least_squares", "cooccurrence"])
def test_informative_probs_are_predicted_perfectly(tmp_path, fit):
    p = _informative(tmp_path / "inf.npz")
    s = simulate(load_scenario(SC, [f"trace.path={p}", f"policies.prefetch.fit={fit}"])).summary["cache"]
    assert s["prefetch_precision"] == 1.0 and s["prefetch_recall"] == 1.0


def test_online_learning_uses_only_the_past():
    ex, probs = _random(7, T=60)
    su = _setup(ex, probs, max_tokens=60)
    a = ProbsLookahead(ProbsLookahead.Config(train="online", refit_every=1), su)
    ex2, probs2 = ex.copy(), probs.copy()
    ex2[40:] = (ex[40:] + 1) % 6  # change the future (rows of steps >= 40), the past stays
    probs2[40:] = probs[40:, :, ::-1]
    b = ProbsLookahead(ProbsLookahead.Config(train="online", refit_every=1), _setup(ex2, probs2, max_tokens=60))
    assert a.plan(0, 0, []) == []  # nothing learnt yet
    assert a.plan(0, 1, []) == [] and a.plan(0, 2, []) == []
    b.plan(0, 0, []), b.plan(0, 1, []), b.plan(0, 2, [])
    for s in range(1, 40):
        for c in range(3):
            assert a.plan(s, c, []) == b.plan(s, c, []), (s, c)
    assert any(a.plan(40, c, []) != b.plan(40, c, []) for c in range(2))  # the changed rows do matter


def test_online_mode_in_a_serving_run_and_errors(tmp_path):
    # a serving run learns online (auto) and says so
    p = ROOT / "traces" / "captured" / "mixtral-8x7b-tiny-random-captured.npz"
    req = ("workload.requests={arrival: {kind: poisson, rate_per_s: 50}, num_requests: 4, prompt_tokens: 12, "
           "output_tokens: {dist: uniform, low: 2, high: 6}}")
    out = simulate(load_scenario(SC, [req]))
    assert out.summary["cache"]["prefetch_issued"] > 0
    assert any("learnt online" in n for n in out.prepared.notes)
    with pytest.raises(InputError, match="train: online") as ei:
        simulate(load_scenario(SC, [req, "policies.prefetch.train=held_out"]))
    assert ei.value.field == "policies.prefetch.train"
    # no probs in the trace
    with pytest.raises(InputError, match="probs") as ei:
        simulate(load_scenario(SC, [f"trace.path={ROOT / 'traces' / 'mixtral-8x7b-synth.npz'}"]))
    assert ei.value.field == "policies.prefetch.kind"
    # the run replays the whole trace: nothing left to fit on
    with pytest.raises(InputError, match="does not replay"):
        simulate(load_scenario(SC, ["workload.max_tokens=420"]))
    assert load_trace(p).probs is not None


def test_bundled_scenario_beats_chance():
    s = simulate(load_scenario(SC)).summary["cache"]
    assert s["prefetch_issued"] > 0
    assert s["prefetch_precision"] > 0.25  # top-2 of 8 at random: 25 %
