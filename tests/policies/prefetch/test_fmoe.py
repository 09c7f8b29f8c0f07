"""fMoE: predictions equal a brute-force nearest-map search over the finished requests' maps; on a
trace whose requests repeat routing patterns it beats frequency top-k's recall; it needs request
ids; the bundled scenario runs."""

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
from moesim.policies.prefetch.fmoe import FMoE
from moesim.traces import Trace, save_trace
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml"


def _setup(ex, request, probs=None, batch=1, max_tokens=None):
    T, C, K = ex.shape
    E = int(ex.max()) + 1 if probs is None else probs.shape[2]
    plan = build_plan(ex, batch_size=batch, max_tokens=max_tokens or T, loop_trace=False)
    tr = Trace(experts=ex, probs=probs, request=np.asarray(request, np.int32))
    return PrefetchSetup(num_columns=C, num_experts=E, top_k=K, plan=plan, col_src=tuple(range(C)), experts=ex,
                         batch_size=batch, seed=0, trace=tr)


def _brute(ex, request, maps, batch, store_size, match_layers, k):
    """Every plan() answer by a direct search: the store = maps of requests whose rows were all
    served in earlier steps (row order, the last ``store_size``); cosine over layers lo..c; best =
    highest similarity, then most recently stored."""
    T, C, _ = ex.shape
    E = maps.shape[2]
    total = np.bincount(request)
    served: dict = {}
    store: list = []  # row indices, insertion order
    out = {}
    for s in range(T // batch):
        rows = list(range(s * batch, s * batch + batch))
        for c in range(C - 1):
            lo = 0 if match_layers is None else max(0, c + 1 - match_layers)
            score = np.zeros(E)
            hit = False
            for r in rows:
                q = maps[r, lo : c + 1].reshape(-1)
                best, best_sim = None, 0.0
                for idx, m in enumerate(store[-store_size:]):
                    v = maps[m, lo : c + 1].reshape(-1)
                    den = np.linalg.norm(v) * np.linalg.norm(q)
                    sim = float(v @ q) / den if den > 0 else 0.0
                    if sim > best_sim or (sim == best_sim and best is not None):
                        best, best_sim = m, sim  # later (more recent) wins ties
                if best is not None:
                    hit = True
                    score += maps[best, c + 1]
            if hit:
                top = np.argsort(-score, kind="stable")[:k]
                out[(s, c)] = [(c + 1, int(e)) for e in top if score[e] > 0]
            else:
                out[(s, c)] = []
        for r in rows:
            q = int(request[r])
            served.setdefault(q, []).append(r)
            if len(served[q]) == total[q]:
                store.extend(sorted(served.pop(q)))
    return out


def _maps(ex, E):
    T, C, K = ex.shape
    m = np.zeros((T, C, E))
    for t in range(T):
        for c in range(C):
            for e in ex[t, c]:
                if e >= 0:
                    m[t, c, e] = 1.0
    return m


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.sampled_from([1, 2]), store_size=st.sampled_from([3, 50]),
       match_layers=st.sampled_from([None, 1, 2]), use_probs=st.booleans())
def test_predictions_equal_a_brute_force_search(seed, batch, store_size, match_layers, use_probs):
    rng = np.random.default_rng(seed)
    T, C, E, K = 24, 4, 5, 2
    ex = np.stack([rng.choice(E, size=K, replace=False) for _ in range(T * C)]).reshape(T, C, K).astype(np.int16)
    request = np.repeat(np.arange(6), rng.multinomial(T - 6, [1 / 6] * 6) + 1)
    probs = None
    if use_probs:
        probs = rng.dirichlet(np.ones(E), size=(T, C)).astype(np.float16)
    su = _setup(ex, request, probs=probs, batch=batch)
    pol = FMoE(FMoE.Config(store_size=store_size, match_layers=match_layers, k=2), su)
    maps = probs.astype(np.float64) if use_probs else _maps(ex, E)
    want = _brute(ex, request, maps, batch, store_size, match_layers, 2)
    for s in range(T // batch):
        for c in range(C):
            got = pol.plan(s, c, su.true_row(s, c))
            if c < C - 1:
                assert got == want[(s, c)], (s, c)


def _pattern_trace(path, seed=0, n_req=40, rows=12, L=32):
    """Requests of four kinds; each kind routes every token along one of its own two fixed paths
    (a path = an expert pair per layer), so a request resembles earlier requests of its kind."""
    rng = np.random.default_rng(seed)
    paths = [[np.stack([rng.choice(8, 2, replace=False) for _ in range(L)]) for _ in range(2)] for _ in range(4)]
    ex, req = [], []
    for r in range(n_req):
        kind = rng.integers(4)
        for _ in range(rows):
            ex.append(paths[kind][rng.integers(2)])
            req.append(r)
    tr = Trace(experts=np.array(ex, np.int16), request=np.array(req, np.int32),
               meta={"num_experts": 8, "top_k": 2, "layers": list(range(L)), "model": "mixtral-8x7b"})
    return save_trace(tr, path)


def test_beats_frequency_topk_on_requests_that_repeat_patterns(tmp_path):
    p = _pattern_trace(tmp_path / "pat.npz")
    base = [f"trace.path={p}", "workload.max_tokens=480", "workload.warmup_tokens=120"]
    fm = simulate(load_scenario(SC, base + ["policies.prefetch.kind=fmoe"])).summary["cache"]
    fq = simulate(load_scenario(SC, base + ["policies.prefetch.kind=frequency_topk"])).summary["cache"]
    assert fm["prefetch_recall"] > fq["prefetch_recall"] + 0.2, (fm, fq)
    assert fm["prefetch_precision"] > fq["prefetch_precision"]
    assert fm["prefetch_recall"] > 0.9  # a path is identified from its first layer


def test_needs_request_ids():
    with pytest.raises(InputError, match="request ids") as ei:
        simulate(load_scenario(SC, ["policies.prefetch.kind=fmoe", "workload.max_tokens=20", "workload.warmup_tokens=0"]))
    assert ei.value.field == "policies.prefetch.kind"
    ex = np.zeros((4, 2, 1), np.int16)
    with pytest.raises(InputError, match="signal: experts"):
        FMoE(FMoE.Config(signal="probs"), _setup(ex, [0, 0, 1, 1]))


def test_bundled_scenario_runs_and_predicts_above_chance():
    s = simulate(load_scenario(ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96-fmoe.yaml")).summary["cache"]
    assert s["prefetch_issued"] > 0
    assert s["prefetch_precision"] > 0.25  # top-2 of 8 at random: 25 %
