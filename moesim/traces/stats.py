"""Summary statistics of a routing trace (what ``moesim trace stats`` prints)."""

from __future__ import annotations

import numpy as np

from moesim.traces.format import Trace

_CHUNK_ENTRIES = 1 << 21


def basic_stats(trace: Trace) -> dict:
    """Shape, expert popularity, distinct experts and temporal reuse of a trace, per layer column.

    Keys: ``tokens``, ``num_layers``, ``layers`` (model layer index per column, or ``None``),
    ``top_k``, ``num_experts``, ``model``, ``source``, ``sha256``, ``empty_slots`` (count of -1
    entries), ``popularity`` (per column, choices of each expert id), ``top_expert_share`` (per
    column, the most chosen expert's share of the column's choices), ``distinct_experts`` (per
    column), ``reuse_rate`` (per column: fraction of rows t >= 1 whose expert set shares at least
    one expert with row t-1's at that column; ``None`` with a single row) and ``reuse_rate_mean``.
    Works chunk by chunk, so memory-mapped traces are not loaded whole.
    """
    e = trace.experts
    T, L, K = (int(x) for x in e.shape)
    E = max(trace.num_experts, 1)
    counts = np.zeros((L, E), dtype=np.int64)
    reused = np.zeros(L, dtype=np.int64)
    empty = 0
    step = max(1, _CHUNK_ENTRIES // max(1, L * K * K))
    prev_last = None
    col_ids = np.arange(L)[None, :, None]
    for a in range(0, T, step):
        c = np.asarray(e[a : a + step]).astype(np.int64)
        valid = c >= 0
        empty += int(c.size - valid.sum())
        flat = (np.broadcast_to(col_ids, c.shape)[valid] * E + c[valid]).ravel()
        counts += np.bincount(flat, minlength=L * E).reshape(L, E)
        # rows compared with their predecessor: within the chunk, plus the chunk's first row with
        # the previous chunk's last
        cur = c if prev_last is None else np.concatenate([prev_last[None], c], axis=0)
        if cur.shape[0] > 1:
            x, y = cur[1:], cur[:-1]
            hit = (x[:, :, :, None] == y[:, :, None, :]) & (x >= 0)[:, :, :, None]
            reused += hit.any(axis=(2, 3)).sum(axis=0)
        prev_last = c[-1]
    total = counts.sum(axis=1)
    share = [float(counts[i].max() / total[i]) if total[i] else 0.0 for i in range(L)]
    reuse = [float(r / (T - 1)) for r in reused] if T > 1 else [None] * L
    meta = trace.meta or {}
    return {
        "tokens": T,
        "num_layers": L,
        "layers": list(trace.layers) if trace.layers is not None else None,
        "top_k": K,
        "num_experts": trace.num_experts,
        "model": meta.get("model"),
        "source": meta.get("source"),
        "sha256": trace.sha256,
        "empty_slots": empty,
        "popularity": counts.tolist(),
        "top_expert_share": share,
        "distinct_experts": [int(x) for x in (counts > 0).sum(axis=1)],
        "reuse_rate": reuse,
        "reuse_rate_mean": float(np.mean(reuse)) if T > 1 else None,
    }


# ----------------------------------------------------------------------------------------------
# full statistics (issue 5, item 3): `moesim trace stats`

#: Window lengths m (tokens) of the segment metrics, as in the moe-lrc paper.
DEFAULT_WINDOWS = (4, 16, 64, 256)
#: Cache policies of the hit-rate table.
HIT_POLICIES = ("lru", "lfu", "belady")
#: Tokens replayed for the hit-rate table by default (the replay is a Python loop per access).
HIT_MAX_TOKENS = 1024


def gini(counts) -> float | None:
    """Gini coefficient of non-negative counts: 0 when all are equal, ``(n-1)/n`` when one holds
    everything; ``None`` when the counts sum to 0.

    ``G = sum_i (2i - n - 1) x_(i) / (n * sum x)`` over the ascending-sorted ``x_(1..n)``.
    """
    x = np.sort(np.asarray(counts, dtype=np.float64).ravel())
    n, s = x.size, float(x.sum())
    if n == 0 or s <= 0:
        return None
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(np.sum((2 * i - n - 1) * x) / (n * s))


def normalized_entropy(counts) -> float | None:
    """Shannon entropy of the distribution ``counts / sum`` divided by ``log(n)``: 1 for a uniform
    distribution over all n entries, 0 when one entry holds everything; ``None`` when ``n < 2`` or
    the counts sum to 0."""
    x = np.asarray(counts, dtype=np.float64).ravel()
    s = float(x.sum())
    if x.size < 2 or s <= 0:
        return None
    p = x[x > 0] / s
    return float(-np.sum(p * np.log(p)) / np.log(x.size))


def _membership(e_l: np.ndarray, E: int) -> np.ndarray:
    """``[T, E]`` int32 0/1: expert chosen by row t at one layer column (``e_l`` is ``[T, K]``)."""
    T = e_l.shape[0]
    rows = np.broadcast_to(np.arange(T, dtype=np.int64)[:, None], e_l.shape)
    v = e_l >= 0
    flat = rows[v] * E + e_l[v].astype(np.int64)
    return np.bincount(flat, minlength=T * E).reshape(T, E).astype(np.int32)


def srp_from_histogram(hist, m: int) -> dict:
    """SRP of the moe-lrc paper from ``hist[v]`` = number of (window, expert) pairs whose expert is
    chosen by exactly ``v`` of the window's ``m`` tokens (``v = 0..m``).

    Follows ljcleo/moe-lrc ``src/30_srp_calc.py`` + ``src/31_srp_refine.py``: segment-level routing
    with threshold ``j`` activates an expert for all ``m`` tokens of a window when at least ``j`` of
    them chose it. Then matches(j) = sum_{v>=j} v*hist[v] (token choices covered), preds(j) =
    m * sum_{v>=j} hist[v] (token slots activated), acts = matches(0) (token choices), and
    F1(j) = 2*matches(j) / max(preds(j) + acts, 1). SRP = max_j F1(j) for j = 0..m. Also returns
    the best threshold (smallest j attaining the max), ``best_m`` = preds/acts at it (activated
    slots per real choice) and ``act_r`` = acts / preds(0) (activation rate).
    """
    h = np.asarray(hist, dtype=np.int64)
    v = np.arange(m + 1, dtype=np.int64)
    matches = np.cumsum((v * h)[::-1])[::-1]
    preds = np.cumsum(h[::-1])[::-1] * m
    acts = int(matches[0])
    f1 = 2.0 * matches / np.maximum(preds + acts, 1)
    j = int(np.argmax(f1))
    return {
        "srp": float(f1[j]),
        "threshold": j,
        "best_m": float(preds[j] / acts) if acts else None,
        "act_r": float(acts / preds[0]) if preds[0] else None,
    }


def trace_statistics(trace: Trace, windows=DEFAULT_WINDOWS, capacities=None, *,
                     hit_policies=HIT_POLICIES, hit_max_tokens: int | None = HIT_MAX_TOKENS) -> dict:
    """All statistics of ``moesim trace stats`` as one JSON-able dict (issue 5, item 3).

    Holds every key of :func:`basic_stats`, plus (lists indexed by layer column):

    * ``gini``, ``entropy`` per column: Gini coefficient and normalised entropy (entropy / log E)
      of the column's expert popularity (:func:`gini`, :func:`normalized_entropy`).
    * ``reuse_by_rank`` ``[L][K]``: P[e[t,l,k] == e[t-1,l,k]] over rows t >= 1 where both entries
      are experts (not -1); ``reuse_in_set_by_rank`` ``[L][K]``: P[e[t,l,k] in row t-1's set at l]
      over t >= 1 with e[t,l,k] >= 0; ``reuse_rate`` (from basic_stats) is P[any overlap].
    * ``transitions``: one entry per consecutive column pair (l, l+1). Over every token t and every
      pair of its choices (a at l, b at l+1) — K*K pairs per token for top-K — the joint counts
      N[a, b] give P(a, b). ``mi_nats`` = sum P(a,b) log(P(a,b) / (P(a) P(b))); ``nmi`` = mi /
      min(H(A), H(B)) in [0, 1] (``None`` when either entropy is 0); ``predictability`` =
      sum_a max_b N[a,b] / sum N (share of layer-(l+1) choices guessed right by the best map from
      the layer-l choice); ``baseline`` = max_b P(b) (the same guess without knowing a).
    * ``segments``: per window length m (sliding windows of m consecutive rows, stride 1, the
      whole trace taken as one sequence; ``None`` when T < m). With c[w, e] = rows of window w
      choosing expert e at a column:
      ``sch[l][c-1]`` = SCH(m, c) = mean over windows of (sum of the c largest c[w, :]) / (K*m),
      for c = 1..E (``sch_mean`` averages the columns);
      ``srp`` (per column) and ``srp_model`` (all columns pooled), see :func:`srp_from_histogram`;
      ``working_set_mean`` / ``working_set_max`` per column: distinct experts in a window.
    * ``hit_rates``: :func:`moesim.policies.cache.curve.hit_curve` for ``hit_policies`` at
      ``capacities`` (expert slots over all columns, global scope, batch 1) over the first
      ``hit_max_tokens`` rows (all with ``None``); default capacities are L*E/8, L*E/4, L*E/2.
      ``None`` when ``capacities`` is empty.

    The numeric parts are numpy-vectorised per column, so a memory-mapped trace is read one
    column at a time.
    """
    base = basic_stats(trace)
    e = trace.experts
    T, L, K = (int(x) for x in e.shape)
    E = max(trace.num_experts, 1)
    windows = tuple(int(m) for m in windows)
    pop = np.asarray(base["popularity"], dtype=np.int64)
    out = dict(base)
    out["gini"] = [gini(pop[l]) for l in range(L)]
    out["entropy"] = [normalized_entropy(pop[l]) for l in range(L)]

    reuse_rank = [[None] * K for _ in range(L)]
    reuse_set = [[None] * K for _ in range(L)]
    transitions = []
    seg = {m: {"sch": [], "srp": [], "working_set_mean": [], "working_set_max": [],
               "_hist": np.zeros(m + 1, dtype=np.int64)} for m in windows}
    prev_col = None
    for l in range(L):
        col = np.asarray(e[:, l, :]).astype(np.int64)  # [T, K]
        if T > 1:
            x, y = col[1:], col[:-1]
            both = (x >= 0) & (y >= 0)
            same = (x == y) & both
            n_both = both.sum(axis=0)
            n_same = same.sum(axis=0)
            inset = ((x[:, :, None] == y[:, None, :]).any(axis=2)) & (x >= 0)
            n_valid = (x >= 0).sum(axis=0)
            n_in = inset.sum(axis=0)
            reuse_rank[l] = [float(n_same[k] / n_both[k]) if n_both[k] else None for k in range(K)]
            reuse_set[l] = [float(n_in[k] / n_valid[k]) if n_valid[k] else None for k in range(K)]
        if prev_col is not None:
            transitions.append(_transition(prev_col, col, E, l - 1, l))
        prev_col = col
        if any(T >= m for m in windows):
            cs = np.zeros((T + 1, E), dtype=np.int64)
            np.cumsum(_membership(col, E), axis=0, out=cs[1:])
        for m in windows:
            s = seg[m]
            if T < m:
                continue
            cnt = cs[m:] - cs[:-m]  # [W, E]
            W = cnt.shape[0]
            top = np.sort(cnt, axis=1)[:, ::-1].sum(axis=0)  # totals of the i-th largest count
            s["sch"].append([float(v) for v in np.cumsum(top) / (W * K * m)])
            h = np.bincount(cnt.ravel(), minlength=m + 1)
            s["_hist"] += h
            s["srp"].append(srp_from_histogram(h, m))
            ws = (cnt > 0).sum(axis=1)
            s["working_set_mean"].append(float(ws.mean()))
            s["working_set_max"].append(int(ws.max()))
    segments = {}
    for m in windows:
        s = seg[m]
        if T < m:
            segments[str(m)] = None
            continue
        sch = np.asarray(s["sch"])
        segments[str(m)] = {
            "windows": T - m + 1,
            "sch": s["sch"],
            "sch_mean": [float(v) for v in sch.mean(axis=0)],
            "srp": s["srp"],
            "srp_model": srp_from_histogram(s["_hist"], m),
            "working_set_mean": s["working_set_mean"],
            "working_set_max": s["working_set_max"],
        }
    out["reuse_by_rank"] = reuse_rank
    out["reuse_in_set_by_rank"] = reuse_set
    out["transitions"] = transitions
    out["segments"] = segments
    out["hit_rates"] = _hit_table(trace, capacities, hit_policies, hit_max_tokens, L, E)
    return out


def _transition(a_col: np.ndarray, b_col: np.ndarray, E: int, la: int, lb: int) -> dict:
    a = np.repeat(a_col, b_col.shape[1], axis=1).ravel()
    b = np.tile(b_col, (1, a_col.shape[1])).ravel()
    v = (a >= 0) & (b >= 0)
    N = np.bincount(a[v] * E + b[v], minlength=E * E).reshape(E, E).astype(np.float64)
    tot = N.sum()
    res = {"from": la, "to": lb, "pairs": int(tot), "mi_nats": None, "nmi": None,
           "predictability": None, "baseline": None}
    if tot <= 0:
        return res
    P = N / tot
    pa, pb = P.sum(axis=1), P.sum(axis=0)
    nz = P > 0
    mi = float(np.sum(P[nz] * np.log(P[nz] / np.outer(pa, pb)[nz])))
    ha = float(-np.sum(pa[pa > 0] * np.log(pa[pa > 0])))
    hb = float(-np.sum(pb[pb > 0] * np.log(pb[pb > 0])))
    h = min(ha, hb)
    res.update(
        mi_nats=max(mi, 0.0),
        nmi=min(max(mi / h, 0.0), 1.0) if h > 0 else None,
        predictability=float(N.max(axis=1).sum() / tot),
        baseline=float(pb.max()),
    )
    return res


def default_capacities(num_layers: int, num_experts: int) -> list[int]:
    """Hit-table capacities: L*E/8, L*E/4 and L*E/2 expert slots (distinct, at least 1)."""
    total = num_layers * num_experts
    return sorted({max(1, total // d) for d in (8, 4, 2)})


def _hit_table(trace, capacities, policies, max_tokens, L, E):
    from moesim.policies.cache.curve import hit_curve

    caps = default_capacities(L, E) if capacities is None else [int(c) for c in capacities]
    if not caps or trace.num_tokens == 0 or not policies:
        return None
    mt = None if max_tokens is None else min(int(max_tokens), trace.num_tokens)
    curve = hit_curve(trace, list(policies), caps, max_tokens=mt)
    curve["max_tokens"] = mt if mt is not None else trace.num_tokens
    return curve


def statistics_figures(stats: dict) -> dict:
    """Plotly figures of :func:`trace_statistics` output, by name: ``popularity`` (heatmap, layer
    column x expert, share of the column's choices), ``reuse`` (same-expert rate by rank and any
    overlap, per column), ``sch`` (SCH(m, c) versus c, one line per window m), ``working_set``
    (mean distinct experts per window versus m) and ``hit_rates`` (when a hit table is present)."""
    import plotly.graph_objects as go

    figs = {}
    L = stats["num_layers"]
    names = [str(x) for x in (stats["layers"] or range(L))]
    pop = np.asarray(stats["popularity"], dtype=np.float64)
    tot = pop.sum(axis=1, keepdims=True)
    share = np.divide(pop, tot, out=np.zeros_like(pop), where=tot > 0)
    fig = go.Figure(go.Heatmap(z=share, x=list(range(pop.shape[1])), y=names, colorbar={"title": "share"}))
    fig.update_layout(title="Expert popularity (share of each layer's choices)", xaxis_title="expert",
                      yaxis_title="layer")
    figs["popularity"] = fig

    fig = go.Figure()
    K = stats["top_k"]
    for k in range(K):
        fig.add_trace(go.Scatter(x=names, y=[r[k] for r in stats["reuse_by_rank"]], mode="lines+markers",
                                 name=f"same expert, rank {k}"))
    fig.add_trace(go.Scatter(x=names, y=stats["reuse_rate"], mode="lines+markers", name="any overlap"))
    fig.update_layout(title="Temporal reuse between consecutive tokens", xaxis_title="layer",
                      yaxis_title="probability")
    figs["reuse"] = fig

    fig = go.Figure()
    ws = go.Figure()
    wx, wy = [], []
    for m, s in stats["segments"].items():
        if s is None:
            continue
        fig.add_trace(go.Scatter(x=list(range(1, len(s["sch_mean"]) + 1)), y=s["sch_mean"],
                                 mode="lines+markers", name=f"m={m}"))
        wx.append(int(m))
        wy.append(float(np.mean(s["working_set_mean"])))
    fig.update_layout(title="SCH(m, c): best segment cache hit rate", xaxis_title="cache size c (experts per layer)",
                      yaxis_title="SCH")
    figs["sch"] = fig
    ws.add_trace(go.Scatter(x=wx, y=wy, mode="lines+markers", name="mean over layers"))
    ws.update_layout(title="Working set: distinct experts per layer in a window", xaxis_title="window m (tokens)",
                     xaxis_type="log", yaxis_title="distinct experts")
    figs["working_set"] = ws

    if stats.get("hit_rates"):
        from moesim.policies.cache.curve import curve_figure

        figs["hit_rates"] = curve_figure(stats["hit_rates"])
    return figs


def format_statistics(stats: dict) -> str:
    """A readable text summary of :func:`trace_statistics` output (what ``moesim trace stats``
    prints)."""
    def f(x, nd=3):
        return "-" if x is None else f"{x:.{nd}f}"

    L, K = stats["num_layers"], stats["top_k"]
    names = [str(x) for x in (stats["layers"] or range(L))]
    lines = [
        f"trace    {stats['model'] or '?'}  sha256 {(stats['sha256'] or '-')[:12]}",
        (f"shape    {stats['tokens']} tokens x {L} MoE layers x top-{K}, {stats['num_experts']} experts/layer, "
         f"{stats['empty_slots']} empty slots"),
        "",
        "per layer: popularity (Gini, normalised entropy, top expert share, distinct), temporal reuse",
        f"{'layer':>6} {'gini':>6} {'entropy':>7} {'top':>6} {'dist':>5} {'overlap':>7}  same-expert by rank",
    ]
    for l in range(L):
        rr = " ".join(f(x) for x in stats["reuse_by_rank"][l])
        lines.append(f"{names[l]:>6} {f(stats['gini'][l]):>6} {f(stats['entropy'][l]):>7} "
                     f"{f(stats['top_expert_share'][l]):>6} {stats['distinct_experts'][l]:>5} "
                     f"{f(stats['reuse_rate'][l]):>7}  {rr}")
    if stats["transitions"]:
        lines += ["", "cross-layer transitions (normalised MI; predictability vs baseline)"]
        for tr in stats["transitions"]:
            lines.append(f"  {names[tr['from']]:>4} -> {names[tr['to']]:<4} nmi {f(tr['nmi'])}  "
                         f"MI {f(tr['mi_nats'])} nats  predict {f(tr['predictability'])} "
                         f"(baseline {f(tr['baseline'])})")
    lines += ["", "segments (sliding windows of m tokens; SRP/SCH as in moe-lrc)"]
    for m, s in stats["segments"].items():
        if s is None:
            lines.append(f"  m={m:<4} (trace shorter than the window)")
            continue
        sch = s["sch_mean"]
        cs = [c for c in (K, 2 * K, 4 * K) if c <= len(sch)]
        sch_txt = "  ".join(f"SCH(c={c}) {f(sch[c - 1])}" for c in cs)
        lines.append(f"  m={m:<4} SRP {f(s['srp_model']['srp'])} (threshold {s['srp_model']['threshold']})  "
                     f"{sch_txt}  working set {f(float(np.mean(s['working_set_mean'])), 2)} mean, "
                     f"{max(s['working_set_max'])} max")
    hr = stats.get("hit_rates")
    if hr:
        lines += ["", f"cache hit rate (global scope, first {hr['max_tokens']} tokens, capacity in expert slots)"]
        caps = sorted({r["capacity"] for r in hr["results"]})
        lines.append(f"  {'policy':<8}" + "".join(f"{c:>9}" for c in caps))
        by = {}
        for r in hr["results"]:
            by.setdefault(r["policy"], {})[r["capacity"]] = r["hit_rate"]
        for p, row in by.items():
            lines.append(f"  {p:<8}" + "".join(f"{f(row.get(c)):>9}" for c in caps))
    return "\n".join(lines)
