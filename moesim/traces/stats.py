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
