"""`trace_statistics` (issue 5, item 3) checked against independent plain-Python recomputation on the
bundled real switch-base-8 trace (and a top-2 slice of the bundled synthetic Mixtral trace), plus
hand-made extremes and the CLI's --html output."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from moesim.cli import main
from moesim.policies.cache.curve import hit_curve
from moesim.traces import Trace, load_trace
from moesim.traces.stats import gini, normalized_entropy, statistics_figures, trace_statistics
from tests.conftest import ROOT

TOL = 1e-12
WINDOWS = (4, 16, 64, 256)


def _close(a, b):
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= TOL


def _rows(trace):
    """experts as nested Python lists [t][l] -> list of expert ids (no -1)."""
    e = np.asarray(trace.experts).tolist()
    return [[[x for x in cell if x >= 0] for cell in row] for row in e]


def _ref_gini(x):
    n, s = len(x), sum(x)
    if s == 0:
        return None
    return sum(abs(a - b) for a in x for b in x) / (2 * n * s)  # mean absolute difference form


def _ref_entropy(x):
    s = sum(x)
    if len(x) < 2 or s == 0:
        return None
    return -sum(v / s * math.log(v / s) for v in x if v) / math.log(len(x))


def _ref_srp(hist, m):
    acts = sum(v * h for v, h in enumerate(hist))
    best, best_j = -1.0, None
    for j in range(m + 1):
        matches = sum(v * hist[v] for v in range(j, m + 1))
        preds = m * sum(hist[v] for v in range(j, m + 1))
        f1 = 2 * matches / max(preds + acts, 1)
        if f1 > best:
            best, best_j = f1, j
    return best, best_j


def _reference(trace):
    rows = _rows(trace)
    raw = np.asarray(trace.experts).tolist()
    T, L, K, E = trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts
    ref = {"popularity": [], "gini": [], "entropy": [], "reuse_by_rank": [], "reuse_in_set": [],
           "overlap": [], "transitions": [], "segments": {}}
    for l in range(L):
        cnt = [0] * E
        for t in range(T):
            for x in rows[t][l]:
                cnt[x] += 1
        ref["popularity"].append(cnt)
        ref["gini"].append(_ref_gini(cnt))
        ref["entropy"].append(_ref_entropy(cnt))
        same, in_set = [], []
        for k in range(K):
            n = s = nv = ni = 0
            for t in range(1, T):
                a, b = raw[t][l][k], raw[t - 1][l][k]
                if a >= 0 and b >= 0:
                    n += 1
                    s += a == b
                if a >= 0:
                    nv += 1
                    ni += a in rows[t - 1][l]
            same.append(s / n if n else None)
            in_set.append(ni / nv if nv else None)
        ref["reuse_by_rank"].append(same)
        ref["reuse_in_set"].append(in_set)
        ov = sum(1 for t in range(1, T) if set(rows[t][l]) & set(rows[t - 1][l]))
        ref["overlap"].append(ov / (T - 1))
    for l in range(L - 1):
        N = {}
        for t in range(T):
            for a in rows[t][l]:
                for b in rows[t][l + 1]:
                    N[(a, b)] = N.get((a, b), 0) + 1
        tot = sum(N.values())
        pa, pb = [0.0] * E, [0.0] * E
        for (a, b), n in N.items():
            pa[a] += n / tot
            pb[b] += n / tot
        mi = sum(n / tot * math.log((n / tot) / (pa[a] * pb[b])) for (a, b), n in N.items())
        ha = -sum(p * math.log(p) for p in pa if p > 0)
        hb = -sum(p * math.log(p) for p in pb if p > 0)
        best = {}
        for (a, b), n in N.items():
            best[a] = max(best.get(a, 0), n)
        ref["transitions"].append({"mi": mi, "nmi": mi / min(ha, hb), "pred": sum(best.values()) / tot,
                                   "base": max(pb)})
    for m in WINDOWS:
        if T < m:
            ref["segments"][m] = None
            continue
        W = T - m + 1
        seg = {"sch": [], "srp": [], "ws_mean": [], "ws_max": []}
        pooled = [0] * (m + 1)
        for l in range(L):
            topsum = [0] * E
            hist = [0] * (m + 1)
            ws = []
            for w in range(W):
                c = [0] * E
                for t in range(w, w + m):
                    for x in rows[t][l]:
                        c[x] += 1
                srt = sorted(c, reverse=True)
                for i in range(E):
                    topsum[i] += sum(srt[: i + 1])
                for v in c:
                    hist[v] += 1
                ws.append(sum(1 for v in c if v))
            seg["sch"].append([s / (W * K * m) for s in topsum])
            seg["srp"].append(_ref_srp(hist, m))
            seg["ws_mean"].append(sum(ws) / W)
            seg["ws_max"].append(max(ws))
            pooled = [a + b for a, b in zip(pooled, hist)]
        seg["srp_model"] = _ref_srp(pooled, m)
        ref["segments"][m] = seg
    return ref


def _check(st, ref, trace):
    L, K = trace.num_layers, trace.top_k
    assert st["popularity"] == ref["popularity"]
    for l in range(L):
        assert _close(st["gini"][l], ref["gini"][l])
        assert _close(st["entropy"][l], ref["entropy"][l])
        assert _close(st["reuse_rate"][l], ref["overlap"][l])
        for k in range(K):
            assert _close(st["reuse_by_rank"][l][k], ref["reuse_by_rank"][l][k])
            assert _close(st["reuse_in_set_by_rank"][l][k], ref["reuse_in_set"][l][k])
    assert len(st["transitions"]) == L - 1
    for got, exp in zip(st["transitions"], ref["transitions"]):
        assert _close(got["mi_nats"], exp["mi"])
        assert _close(got["nmi"], exp["nmi"])
        assert _close(got["predictability"], exp["pred"])
        assert _close(got["baseline"], exp["base"])
    for m in WINDOWS:
        got, exp = st["segments"][str(m)], ref["segments"][m]
        if exp is None:
            assert got is None
            continue
        for l in range(L):
            assert all(_close(a, b) for a, b in zip(got["sch"][l], exp["sch"][l]))
            assert _close(got["srp"][l]["srp"], exp["srp"][l][0])
            assert got["srp"][l]["threshold"] == exp["srp"][l][1]
            assert _close(got["working_set_mean"][l], exp["ws_mean"][l])
            assert got["working_set_max"][l] == exp["ws_max"][l]
        assert _close(got["srp_model"]["srp"], exp["srp_model"][0])
        assert got["srp_model"]["threshold"] == exp["srp_model"][1]


def test_stats_on_bundled_real_trace_match_independent_recomputation():
    tr = load_trace(ROOT / "traces" / "switch-base-8.npz")
    st = trace_statistics(tr)
    json.dumps(st, allow_nan=False)  # JSON-able
    _check(st, _reference(tr), tr)
    assert st["segments"]["256"] is None  # 215 tokens: no window of 256
    # the hit-rate table is the cache-curve tool's output for the default capacities
    hr = st["hit_rates"]
    exp = hit_curve(tr, ["lru", "lfu", "belady"], [6, 12, 24], max_tokens=215)
    assert hr["results"] == exp["results"]
    by = {(r["policy"], r["capacity"]): r["hit_rate"] for r in hr["results"]}
    for c in (6, 12, 24):  # Belady is optimal for demand paging
        assert by[("belady", c)] >= max(by[("lru", c)], by[("lfu", c)])


def test_stats_on_top2_slice_match_independent_recomputation():
    full = load_trace(ROOT / "traces" / "mixtral-8x7b-synth.npz")
    e = np.array(full.experts[:300, :4])
    e[5, 1, 1] = -1  # an empty slot (dynamic top-k) to exercise -1 handling
    tr = Trace(experts=e, meta={"num_experts": 8})
    st = trace_statistics(tr, capacities=[])
    assert st["hit_rates"] is None and st["empty_slots"] == 1
    _check(st, _reference(tr), tr)


def test_gini_and_entropy_extremes():
    assert gini([5, 5, 5, 5]) == 0.0
    assert normalized_entropy([5, 5, 5, 5]) == pytest.approx(1.0, abs=TOL)
    assert normalized_entropy([0, 9, 0, 0]) == 0.0
    assert gini([0, 9, 0, 0]) == pytest.approx(3 / 4, abs=TOL)  # (n-1)/n
    assert gini([0, 0]) is None and normalized_entropy([3]) is None


def test_uniform_and_single_expert_traces():
    T, E = 64, 4
    uni = Trace(experts=(np.arange(T) % E).astype(np.int16).reshape(T, 1, 1), meta={"num_experts": E})
    st = trace_statistics(uni, windows=(4, 16), capacities=[])
    assert st["gini"] == [0.0] and st["entropy"][0] == pytest.approx(1.0, abs=TOL)
    assert st["reuse_by_rank"] == [[0.0]]
    # every window of 4 holds each expert once: SCH(4, c) = c/4, working set 4
    assert st["segments"]["4"]["sch_mean"] == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=TOL)
    assert st["segments"]["4"]["working_set_mean"] == [4.0]
    one = Trace(experts=np.zeros((T, 1, 1), dtype=np.int16), meta={"num_experts": E})
    st = trace_statistics(one, windows=(4,), capacities=[])
    assert st["entropy"] == [0.0] and st["reuse_by_rank"] == [[1.0]]
    s4 = st["segments"]["4"]
    assert s4["sch_mean"] == [1.0] * E and s4["srp_model"]["srp"] == 1.0


def test_sch_bounds_on_bundled_traces():
    for name in ("switch-base-8.npz", "mixtral-8x7b-synth.npz"):
        tr = load_trace(ROOT / "traces" / name)
        E = tr.num_experts
        st = trace_statistics(tr, capacities=[])
        for seg in st["segments"].values():
            if seg is None:
                continue
            for curve in seg["sch"]:
                assert all(b >= a - TOL for a, b in itertools.pairwise(curve))  # non-decreasing in c
                for c, v in enumerate(curve, start=1):
                    # the c largest of E counts hold at least c/E of the window's k*m choices
                    assert c / E - TOL <= v <= 1 + TOL
                assert curve[-1] == pytest.approx(1.0, abs=TOL)
            for r in seg["srp"]:
                assert 0 <= r["srp"] <= 1


def test_cli_stats_text_json_and_html(tmp_path, capsys):
    p = ROOT / "traces" / "switch-base-8.npz"
    out = tmp_path / "figs"
    assert main(["trace", "stats", str(p), "--html", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("gini", "SRP", "SCH(c=1)", "nmi", "belady"):
        assert word in text
    names = {f.name for f in out.iterdir()}
    assert names == {f"{n}.html" for n in ("popularity", "reuse", "sch", "working_set", "hit_rates")}
    assert all((out / n).stat().st_size > 1000 for n in names)
    assert main(["trace", "stats", str(p), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["tokens"] == 215 and "segments" in st and "popularity" in st
    assert set(statistics_figures(st)) == {"popularity", "reuse", "sch", "working_set", "hit_rates"}
