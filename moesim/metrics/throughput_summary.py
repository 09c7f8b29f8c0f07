"""``summary.json`` of a throughput-mode run (MoE-Lightning, Klotski, MoE-Gen): the keys of DESIGN
3.4 computed from the throughput engine's result, plus a ``throughput`` block with the system's
own report (policy, batch structure, bytes per token, module accounting)."""

from __future__ import annotations

import numpy as np

from moesim.engine.throughput import TP_CP_KEYS
from moesim.metrics.summary import (
    layer_cache_row,
    routing_block,
    run_header,
    step_latencies_s,
    window_split,
)


def build_throughput_summary(prep, res, *, scenario_hash: str, wall_time_s: float) -> dict:
    """The summary dict of one throughput run (JSON-able; deterministic apart from ``wall_time_s``)."""
    sc, ctx = prep.scenario, prep.ctx
    N = res.batch_size
    lat = step_latencies_s(res)
    measured = len(lat)
    window = float(res.step_end_s[-1] - res.measure_start_s)
    tokens = measured * N
    c = res.counters
    W = res.warmup_steps
    cp, util = window_split(res, TP_CP_KEYS, window)
    acc = {"accesses": 0, "hits": 0, "misses": 0, "loads": 0, "prefetch_issued": 0, "prefetch_used": 0,
           "prefetch_wasted": 0}
    per_block: dict = {}
    for (s, b), a in sorted(ctx.access.items()):
        if s < W:
            continue
        row = per_block.setdefault(b, dict.fromkeys(acc, 0))
        for k in acc:
            v = getattr(a, k)
            acc[k] += v
            row[k] += v
    tok = c["tokens"]
    choices = c["expert_choices"]
    per_layer = []
    for i, layer in enumerate(prep.model_layers):
        row = per_block.get(layer, dict.fromkeys(acc, 0))
        h, m_ = row["hits"], row["misses"]
        per_layer.append({
            **layer_cache_row(layer, prep.col_src[i], h, m_),
            "loads": row["loads"],
            "prefetch_issued": row["prefetch_issued"],
            "prefetch_used": row["prefetch_used"],
            "routed_tokens": int(choices.get(layer, 0)),
            "attention_tokens": int(sum(v for (k, b), v in tok.items() if b == layer and k in ATTENTION_KINDS)),
        })
    bk = c["h2d_bytes_by_kind"]
    h2d_experts = sum(v for k, v in bk.items() if k in EXPERT_COPY_KINDS)
    h2d_dense = sum(v for k, v in bk.items() if k in DENSE_COPY_KINDS)
    h2d_weights_pages = bk.get("weight_page", 0) + bk.get("block_weights", 0)
    hits = acc["hits"]
    summary = {
        **run_header(sc, scenario_hash=scenario_hash, wall_time_s=wall_time_s, events=res.events,
                     sim_time_s=res.step_end_s[-1], window=window, tokens=tokens, requests=N,
                     layer_steps=measured * len(prep.model_layers), steps=measured, warmup_steps=W, lat_s=lat),
        "cache": {
            "policy": sc.policies.cache.kind,
            "accesses": int(acc["accesses"]),
            "hits": int(hits),
            "misses": int(acc["misses"]),
            "hit_rate": float(hits / acc["accesses"]) if acc["accesses"] else None,
            "streamed": int(acc["loads"]),
            "cpu_executed": 0,
            "prefetch_issued": int(acc["prefetch_issued"]),
            "prefetch_used": int(acc["prefetch_used"]),
            "prefetch_wasted": int(acc["prefetch_wasted"]),
            "prefetch_policy": f"{sc.policies.execution.kind} (built in)" if acc["prefetch_issued"] else sc.policies.prefetch.kind,
            "evictions": 0,
            "slots": 0,
        },
        "transfers": {
            "bytes_h2d": int(c["bytes_h2d"]),
            "bytes_h2d_experts": int(h2d_experts),
            "bytes_h2d_dense": int(h2d_dense),
            "bytes_h2d_weight_pages": int(h2d_weights_pages),
            "bytes_h2d_kv": int(bk.get("kv_in", 0) + bk.get("attn_in_kv", 0)),  # KV cache copied in
            "bytes_h2d_activations": int(sum(v for k, v in bk.items() if k in ACTIVATION_KINDS_H2D)),
            "bytes_d2h": int(c["bytes_d2h"]),
            "bytes_ssd": 0,
            "bytes_network": 0,
            "copies": int(c["copies_h2d"] + c["copies_d2h"]),
            "expert_bytes": int(sc.model.expert_bytes),
        },
        "routing": routing_block(sc, prep.trace),
        "utilization": util,
        "critical_path_ms": cp,
        "memory": prep.memory,
        "per_layer": per_layer,
        "predictor": {"expert": prep.predictor.expert_source, "cpu_attention": "roofline", "dense": "roofline"},
        "policies": {fam: getattr(sc.policies, fam).kind for fam in ("cache", "prefetch", "execution", "precision")},
        "throughput": _throughput_block(ctx, res, lat, tokens, window, c),
        "routing_note": prep.routing_note,
    }
    return summary


#: op kinds that carry tokens through attention (one per token per block)
ATTENTION_KINDS = ("pre_attn", "block", "attention_gpu", "attn_module")
EXPERT_COPY_KINDS = ("expert_load", "expert_prefetch")
DENSE_COPY_KINDS = ("dense_weights",)
ACTIVATION_KINDS_H2D = ("attn_out", "attn_in_hidden", "expert_in", "head_in")


def _throughput_block(ctx, res, lat, tokens, window, c) -> dict:
    N = res.batch_size
    lat = np.asarray(lat)
    out = {
        **ctx.info,
        "sequences": int(N),
        "decode_steps": int(res.steps),
        "warmup_steps": int(res.warmup_steps),
        "tokens_per_step": int(N),
        "step_time_ms": float(lat.mean() * 1e3) if lat.size else None,
        "step_time_per_token_ms": float(lat.mean() * 1e3 / N) if lat.size else None,
        "bytes_h2d_per_token": float(c["bytes_h2d"] / tokens) if tokens else None,
        "bytes_d2h_per_token": float(c["bytes_d2h"] / tokens) if tokens else None,
        "h2d_bytes_by_kind": {k: int(v) for k, v in sorted(c["h2d_bytes_by_kind"].items())},
        "d2h_bytes_by_kind": {k: int(v) for k, v in sorted(c["d2h_bytes_by_kind"].items())},
        "ops_by_kind": {k: int(v) for k, v in sorted(c["ops_by_kind"].items())},
        "kv_cache_bytes": int(N * ctx.final_context * ctx.costs.kv_token),
    }
    return out
