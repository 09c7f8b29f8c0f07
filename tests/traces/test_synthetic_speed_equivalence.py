"""The faster synthetic generators give byte-identical traces to the implementation they replaced.

The previous (slower) implementation of :func:`moesim.traces.synthesize` and of
:func:`moesim.traces.synthesize_from_profile` is kept here, privately, as the reference: same
seeds, same random calls in the same order, straightforward ``argpartition`` / ``argsort`` per row
and round-by-round reuse resolution. The package version draws the same streams but selects the
race winners by a threshold filter and a packed sort (ties fall back to the reference rule),
resolves deep reuse chains by fixed-point sweeps, and sorts only the first 2K experts for the
"avoid" rows. Hypothesis drives shapes, Zipf exponents (up to float32 overflow), reuse
probabilities, seeds and chunk sizes; the helpers are also checked on tie-heavy inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.traces import synthetic as syn
from moesim.traces.synthetic import (
    _first_in_order,
    _race_thresholds,
    _resolve_avoid,
    _resolve_reuse,
    _resolve_reuse_jacobi,
    _top_k_rows,
    _top_k_rows_reference,
    synthesize,
    synthesize_from_profile,
)

_REF_CHUNK_ENTRIES = 1 << 22


# ---------------------------------------------------------------------------------------------
# the previous implementation (reference)


def _ref_race_top_k(rng, logw, T, K):
    L, E = logw.shape
    inv_w = np.exp(-logw).astype(np.float32)
    out = np.empty((T, L, K), dtype=np.int32)
    rows = max(1, _REF_CHUNK_ENTRIES // (L * E))
    for a in range(0, T, rows):
        b = min(T, a + rows)
        key = rng.standard_exponential(size=(b - a, L, E), dtype=np.float32)
        key *= inv_w
        if K == E:
            idx = np.argsort(key, axis=2, kind="stable")
        else:
            part = np.argpartition(key, K - 1, axis=2)[:, :, :K]
            order = np.argsort(np.take_along_axis(key, part, axis=2), axis=2, kind="stable")
            idx = np.take_along_axis(part, order, axis=2)
        out[a:b] = idx
    return out


def _ref_fill_rows(prev, m, c):
    reused = np.where(m, prev, -1)
    taken = (c[:, :, None] == reused[:, None, :]).any(axis=2)
    avail = np.take_along_axis(c, np.argsort(taken, axis=1, kind="stable"), axis=1)
    slot = np.maximum(np.cumsum(~m, axis=1) - 1, 0)
    return np.where(m, prev, np.take_along_axis(avail, slot, axis=1))


def _ref_resolve_reuse(cand, reuse):
    T, L, K = cand.shape
    n_re = reuse.sum(axis=2)
    none = n_re == 0
    full = n_re == K
    partial = ~none & ~full
    t_idx = np.arange(T)[:, None]
    src = np.maximum.accumulate(np.where(full, 0, t_idx), axis=0)
    out = np.empty_like(cand)
    out[none] = cand[none]
    if partial.any():
        last_none = np.maximum.accumulate(np.where(none, t_idx, 0), axis=0)
        n_part = np.cumsum(partial, axis=0)
        depth = n_part - np.take_along_axis(n_part, last_none, axis=0)
        ts, ls = np.nonzero(partial)
        d = depth[ts, ls]
        order = np.argsort(d, kind="stable")
        ts, ls, d = ts[order], ls[order], d[order]
        bounds = np.flatnonzero(np.diff(d)) + 1
        for tt, ll in zip(np.split(ts, bounds), np.split(ls, bounds)):
            prev = out[src[tt - 1, ll], ll]
            out[tt, ll] = _ref_fill_rows(prev, reuse[tt, ll], cand[tt, ll])
    tf, lf = np.nonzero(full)
    if tf.size:
        out[tf, lf] = out[src[tf, lf], lf]
    return out


def _ref_gates(rng_gate, T, L, K):
    z = rng_gate.standard_normal((T, L, K), dtype=np.float32)
    z = -np.sort(-z, axis=2)
    z -= z[:, :, :1]
    np.exp(z, out=z)
    z /= z.sum(axis=2, keepdims=True)
    return z.astype(np.float16)


def _ref_synthesize(T, L, E, K, zipf_s, reuse_prob, seed):
    s_perm, s_pick, s_reuse, s_gate = np.random.SeedSequence(seed).spawn(4)
    rng_perm = np.random.default_rng(s_perm)
    rank_logw = -float(zipf_s) * np.log1p(np.arange(E, dtype=np.float64))
    logw = np.empty((L, E))
    for l in range(L):
        logw[l, rng_perm.permutation(E)] = rank_logw
    with np.errstate(over="ignore", invalid="ignore"):
        cand = _ref_race_top_k(np.random.default_rng(s_pick), logw, T, K)
    if reuse_prob > 0:
        reuse = np.random.default_rng(s_reuse).random((T, L, K)) < reuse_prob
        reuse[0] = False
    else:
        reuse = np.zeros((T, L, K), dtype=bool)
    experts = _ref_resolve_reuse(cand, reuse)
    weights = _ref_gates(np.random.default_rng(s_gate), T, L, K)
    dtype = np.int16 if E <= np.iinfo(np.int16).max else np.int32
    return experts.astype(dtype), weights


def _ref_resolve_avoid(order, avoid, K):
    T, _E = order.shape
    out = order[:, :K].copy()
    avoid = avoid.copy()
    avoid[0] = False
    rows = np.flatnonzero(avoid)
    if rows.size == 0:
        return out
    sub = order[rows]
    for _ in range(T):
        prev = out[rows - 1]
        hit = (sub[:, :, None] == prev[:, None, :]).any(axis=2)
        new = np.take_along_axis(sub, np.argsort(hit, axis=1, kind="stable")[:, :K], axis=1)
        if np.array_equal(new, out[rows]):
            break
        out[rows] = new
    return out


def _ref_from_profile(profile, T, seed):
    E, K = int(profile["num_experts"]), int(profile["top_k"])
    L = len(profile["layers"])
    pop = np.asarray(profile["popularity"], dtype=np.float64)
    rho = np.asarray(profile["reuse_prob"], dtype=np.float64)
    trans = np.asarray(profile["transitions"], dtype=np.float64).reshape(-1, E, E)
    s_pick, s_reuse, s_gate = np.random.SeedSequence(seed).spawn(3)
    rng_pick = np.random.default_rng(s_pick)
    rng_reuse = np.random.default_rng(s_reuse)
    rng_gate = np.random.default_rng(s_gate)
    experts = np.empty((T, L, K), dtype=np.int32)
    with np.errstate(divide="ignore"):
        for l in range(L):
            if l == 0:
                w = np.broadcast_to(pop[0], (T, E))
            else:
                w = trans[l - 1][experts[:, l - 1, :]].mean(axis=1)
            key = rng_pick.standard_exponential(size=(T, E))
            key = np.where(w > 0, key / np.where(w > 0, w, 1.0), np.inf)
            u = rng_reuse.random((T, K))
            if rho[l] >= 0:
                if K == E:
                    cand = np.argsort(key, axis=1, kind="stable")
                else:
                    part = np.argpartition(key, K - 1, axis=1)[:, :K]
                    order = np.argsort(np.take_along_axis(key, part, axis=1), axis=1, kind="stable")
                    cand = np.take_along_axis(part, order, axis=1)
                reuse = u < rho[l]
                reuse[0] = False
                experts[:, l, :] = _ref_resolve_reuse(cand[:, None, :].astype(np.int32), reuse[:, None, :])[:, 0, :]
            else:
                experts[:, l, :] = _ref_resolve_avoid(np.argsort(key, axis=1, kind="stable"), u[:, 0] < -rho[l], K)
    gm, gs = profile.get("gate_mean"), profile.get("gate_std")
    if gm is not None and gs is not None and len(gm) == K:
        z = rng_gate.standard_normal((T, L, K)) * np.asarray(gs) + np.asarray(gm)
        z = -np.sort(-np.clip(z, 1e-3, 1.0), axis=2)
        z /= z.sum(axis=2, keepdims=True)
        weights = z.astype(np.float16)
    else:
        weights = _ref_gates(rng_gate, T, L, K)
    dtype = np.int16 if E <= np.iinfo(np.int16).max else np.int32
    return experts.astype(dtype), weights


# ---------------------------------------------------------------------------------------------
# whole generators


@st.composite
def _shapes(draw, max_e=300):
    E = draw(st.one_of(st.integers(1, 12), st.integers(13, max_e)))
    K = draw(st.one_of(st.integers(1, min(E, 8)), st.integers(1, E)))
    return E, K


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=_shapes(),
    T=st.integers(1, 160),
    L=st.integers(1, 4),
    zipf_s=st.one_of(st.just(0.0), st.floats(0.0, 3.0), st.floats(15.0, 60.0)),
    reuse_prob=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**32 - 1),
    chunk=st.sampled_from([None, 1 << 8, 1 << 12]),
)
def test_synthesize_matches_previous_implementation(shape, T, L, zipf_s, reuse_prob, seed, chunk):
    E, K = shape
    with pytest.MonkeyPatch.context() as mp, np.errstate(over="ignore", invalid="ignore"):
        if chunk is not None:  # several chunks, a shorter last one: the draw stream must not depend on it
            mp.setattr(syn, "_CHUNK_ENTRIES", chunk)
        tr = synthesize(num_tokens=T, layers=list(range(L)), num_experts=E, top_k=K, zipf_s=zipf_s,
                        reuse_prob=reuse_prob, seed=seed)
    experts, weights = _ref_synthesize(T, L, E, K, zipf_s, reuse_prob, seed)
    assert tr.experts.dtype == experts.dtype and tr.weights.dtype == weights.dtype
    assert tr.experts.tobytes() == experts.tobytes()
    assert tr.weights.tobytes() == weights.tobytes()


@pytest.mark.parametrize(
    "T, L, E, K, zipf_s, reuse_prob, seed",
    [
        (3000, 58, 256, 8, 0.8, 0.1, 0),  # DeepSeek-V3 shape (several chunks)
        (2000, 16, 64, 8, 0.0, 0.3, 5),  # OLMoE shape, uniform popularity
        (2000, 24, 60, 4, 1.2, 0.6, 9),  # Qwen1.5-MoE shape, deep reuse chains
        (4000, 4, 128, 1, 0.9, 0.95, 2),  # top-1, reuse near 1 (the Jacobi path)
        (1500, 3, 40000, 2, 0.5, 0.2, 1),  # int32 experts
        (3000, 32, 8, 2, 0.8, 0.1, 0),  # Mixtral shape (reference selection path)
    ],
)
def test_model_sized_configs_match_previous_implementation(T, L, E, K, zipf_s, reuse_prob, seed):
    tr = synthesize(num_tokens=T, layers=list(range(L)), num_experts=E, top_k=K, zipf_s=zipf_s,
                    reuse_prob=reuse_prob, seed=seed)
    experts, weights = _ref_synthesize(T, L, E, K, zipf_s, reuse_prob, seed)
    assert tr.experts.tobytes() == experts.tobytes()
    assert tr.weights.tobytes() == weights.tobytes()


def _random_profile(rng, L, E, K, rho, gates):
    pop = rng.dirichlet(np.full(E, 0.5), size=L)
    pop[:, rng.random(E) < 0.2] = 0.0  # some experts never chosen (w = 0: infinite race times)
    pop[:, 0] += 1e-3
    pop /= pop.sum(axis=1, keepdims=True)
    trans = rng.dirichlet(np.full(E, 0.3), size=(max(L - 1, 0), E))
    trans[trans < 0.02] = 0.0
    trans[:, :, 0] += 1e-3
    trans /= trans.sum(axis=2, keepdims=True)
    prof = {
        "num_experts": E,
        "top_k": K,
        "layers": list(range(L)),
        "popularity": pop.tolist(),
        "reuse_prob": rho,
        "transitions": trans.tolist(),
        "gate_mean": None,
        "gate_std": None,
        "model": "m",
        "source": {"sha256": "0" * 64, "source": "test"},
    }
    if gates:
        prof["gate_mean"] = sorted(rng.random(K).tolist(), reverse=True)
        prof["gate_std"] = (0.1 * rng.random(K)).tolist()
    return prof


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=_shapes(max_e=80),
    T=st.integers(1, 200),
    L=st.integers(1, 4),
    rho=st.data(),
    gates=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_fitted_generation_matches_previous_implementation(shape, T, L, rho, gates, seed):
    E, K = shape
    rhos = rho.draw(st.lists(st.one_of(st.sampled_from([-1.0, 0.0, 1.0]), st.floats(-1.0, 1.0)),
                             min_size=L, max_size=L))
    prof = _random_profile(np.random.default_rng(seed % 1000), L, E, K, rhos, gates)
    tr = synthesize_from_profile(prof, num_tokens=T, seed=seed)
    experts, weights = _ref_from_profile(prof, T, seed)
    assert tr.experts.tobytes() == experts.tobytes()
    assert tr.weights.tobytes() == weights.tobytes()


@pytest.mark.parametrize("rho", [0.3, 0.97, -0.4, -0.95])
def test_fitted_generation_many_experts_matches(rho):
    prof = _random_profile(np.random.default_rng(4), 3, 256, 8, [rho, rho, 0.5], gates=False)
    tr = synthesize_from_profile(prof, num_tokens=3000, seed=11)
    experts, weights = _ref_from_profile(prof, 3000, 11)
    assert tr.experts.tobytes() == experts.tobytes()
    assert tr.weights.tobytes() == weights.tobytes()


def test_fitted_profile_of_a_bundled_trace_matches():
    from moesim.traces import fit_profile, load_trace

    prof = fit_profile(load_trace("traces/switch-base-8.npz"))
    tr = synthesize_from_profile(prof, num_tokens=2000, seed=3)
    experts, weights = _ref_from_profile(prof, 2000, 3)
    assert tr.experts.tobytes() == experts.tobytes() and tr.weights.tobytes() == weights.tobytes()


# ---------------------------------------------------------------------------------------------
# helpers on adversarial inputs (ties, zeros, infinities, NaN)


def _tied_keys(rng, n, L, E, levels, specials):
    key = rng.integers(0, levels, size=(n, L, E)).astype(np.float32)
    if specials:
        key[rng.random(key.shape) < 0.05] = np.inf
        key[rng.random(key.shape) < 0.02] = np.nan
    return key


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 12),
    L=st.integers(1, 3),
    E=st.integers(2, 64),
    data=st.data(),
    levels=st.sampled_from([2, 5, 40, 1 << 20]),
    specials=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_top_k_rows_equals_the_reference_rule_with_ties(n, L, E, data, levels, specials, seed):
    K = data.draw(st.integers(1, E - 1))
    rng = np.random.default_rng(seed)
    key = _tied_keys(rng, n, L, E, levels, specials)
    thr = data.draw(st.sampled_from(["inf", "random", "zero"]))
    t = {"inf": np.full((L, 1), np.inf, np.float32), "zero": np.zeros((L, 1), np.float32),
         "random": rng.integers(0, levels + 1, size=(L, 1)).astype(np.float32)}[thr]
    np.testing.assert_array_equal(_top_k_rows(key, t, K), _top_k_rows_reference(key.reshape(-1, E), K))


@settings(max_examples=60, deadline=None)
@given(R=st.integers(1, 40), E=st.integers(1, 40), data=st.data(), levels=st.sampled_from([3, 50, 1 << 30]),
       seed=st.integers(0, 2**32 - 1))
def test_first_in_order_equals_a_stable_sort_with_ties(R, E, data, levels, seed):
    n = data.draw(st.integers(1, E))
    rng = np.random.default_rng(seed)
    key = rng.integers(0, levels, size=(R, E)).astype(np.float64)
    key[rng.random(key.shape) < 0.1] = np.inf
    np.testing.assert_array_equal(_first_in_order(key, n), np.argsort(key, axis=1, kind="stable")[:, :n])


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 400), E=st.integers(1, 30), data=st.data(), q=st.floats(0, 1),
       seed=st.integers(0, 2**32 - 1))
def test_resolve_avoid_on_the_first_2k_equals_the_full_order(T, E, data, q, seed):
    K = data.draw(st.integers(1, E))
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((T, E)), axis=1)
    avoid = rng.random(T) < q
    np.testing.assert_array_equal(_resolve_avoid(order[:, : min(E, 2 * K)], avoid, K),
                                  _ref_resolve_avoid(order, avoid, K))


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 500), L=st.integers(1, 3), E=st.integers(1, 40), data=st.data(),
       p=st.one_of(st.floats(0, 1), st.floats(0.9, 1.0)), seed=st.integers(0, 2**32 - 1))
def test_resolve_reuse_and_its_jacobi_solver_match_the_rounds(T, L, E, data, p, seed):
    K = data.draw(st.integers(1, E))
    rng = np.random.default_rng(seed)
    cand = np.argsort(rng.random((T, L, E)), axis=2)[:, :, :K].astype(np.int32)
    reuse = rng.random((T, L, K)) < p
    reuse[0] = False
    ref = _ref_resolve_reuse(cand, reuse)
    np.testing.assert_array_equal(_resolve_reuse(cand, reuse), ref)
    got = _resolve_reuse_jacobi(cand, reuse)
    assert got is None or np.array_equal(got, ref)  # None: not settled within the sweep cap


def test_deep_chains_take_the_jacobi_solver_and_agree():
    rng = np.random.default_rng(0)
    cand = np.argsort(rng.random((6000, 1, 64)), axis=2)[:, :, :8].astype(np.int32)
    reuse = rng.random((6000, 1, 8)) < 0.95
    reuse[0] = False
    got = _resolve_reuse_jacobi(cand, reuse)
    assert got is not None
    np.testing.assert_array_equal(got, _ref_resolve_reuse(cand, reuse))
    np.testing.assert_array_equal(_resolve_reuse(cand, reuse), got)


def test_deepseek_sized_race_mostly_avoids_the_reference_path(monkeypatch):
    """The fast selection is really used at DeepSeek-V3 size: few rows fall back to the
    reference rule (rows with fewer than K+1 times below the threshold, or ties)."""
    E, K, L = 256, 8, 58
    inv_w = (np.arange(1, E + 1, dtype=np.float64) ** 0.8).astype(np.float32)[None, :].repeat(L, 0)
    thr = _race_thresholds(inv_w, K)
    assert thr is not None and thr.shape == (L, 1)
    calls = []
    real = syn._top_k_rows_reference
    monkeypatch.setattr(syn, "_top_k_rows_reference", lambda key, k: calls.append(len(key)) or real(key, k))
    key = np.random.default_rng(1).standard_exponential((40, L, E), dtype=np.float32) * inv_w
    got = syn._top_k_rows(key, thr, K)
    np.testing.assert_array_equal(got, real(key.reshape(-1, E), K))
    assert sum(calls) < 0.1 * 40 * L
    assert _race_thresholds(inv_w[:, :12], K) is None  # too few experts for the filter to pay
