"""``summary.json`` of an expert-parallel run: the DESIGN 3.4 keys plus an ``expert_parallel`` block
(placement, all-to-all, per-GPU load and busy time, imbalance, traffic matrices, link use)."""

from __future__ import annotations

import numpy as np

from moesim.metrics.summary import routing_block, run_header, step_latencies_s

GPU_MATRIX_MAX = 64  # the GPU x GPU traffic matrix goes into summary.json up to this many GPUs


def _util(busy: float, window: float) -> float:
    return float(busy / window) if window > 0 else 0.0


def _efficiency(sc, tokens, window, G):
    """Throughput per GPU, and per dollar when GPU-hour prices are given (AFD: each pool its own)."""
    par = sc.parallel
    if window <= 0:
        return None
    tok_s = tokens / window
    M = par.attention_gpus or 0
    out = {"tokens_per_s_per_gpu": tok_s / G}
    if par.gpu_cost_per_hour is not None:
        a_price = par.attention_gpu_cost_per_hour or par.gpu_cost_per_hour
        dollars_per_s = ((G - M) * par.gpu_cost_per_hour + M * a_price) / 3600.0
        out["cost_per_hour"] = dollars_per_s * 3600.0
        out["tokens_per_dollar"] = tok_s / dollars_per_s
    return out


def _elastic(report, lat_s, warm):
    """The scale-up's report with step latencies before, at and after it (ms)."""
    if report is None:
        return None
    k = report["at_step"] - warm  # index of the scale-up step among measured steps
    d = dict(report)
    lat = np.asarray(lat_s) * 1e3
    d["step_ms_before"] = float(lat[:k].mean()) if k > 0 else None
    d["step_ms_at_scale"] = float(lat[k]) if 0 <= k < len(lat) else None
    d["step_ms_after"] = float(lat[k + 1:].mean()) if k + 1 < len(lat) else None
    return d


def build_ep_summary(prep, res, *, scenario_hash: str, wall_time_s: float) -> dict:
    """The summary dict of one expert-parallel run (deterministic apart from ``wall_time_s``)."""
    sc = prep.scenario
    topo = prep.topo
    G = topo.num_gpus
    ends = res.step_end_s
    lat = step_latencies_s(res)
    window = float(ends[-1] - res.measure_start_s)
    n_steps = len(lat)
    R = res.tokens_per_step
    st = res.step_tokens if res.step_tokens is not None else np.full(len(ends), R)
    tokens = int(st[res.warmup_steps:].sum())
    L = len(prep.model_layers)
    cp = {k: float(v * 1e3) for k, v in res.cp.items()}
    cp["total"] = window * 1e3
    cp["idle"] = max(0.0, cp["total"] - sum(v for k, v in cp.items() if k not in ("total", "idle")))
    link_ids = topo.link_ids
    cap = np.asarray(topo.capacity, dtype=np.float64)
    lb = res.link_bytes
    links = {}
    for i in np.flatnonzero(lb > 0):
        links[link_ids[i]] = {"bytes": float(lb[i]), "utilization": _util(lb[i] / cap[i], window)}
    util = {f"gpu{g}.compute": _util(res.gpu_busy_s[g], window) for g in range(G)}
    for lid, d in links.items():
        util[f"link.{lid}"] = d["utilization"]
    node = np.asarray(topo.node_of)
    nn = topo.num_nodes
    node_m = np.zeros((nn, nn))
    np.add.at(node_m, (node[:, None].repeat(G, 1), node[None, :].repeat(G, 0)), res.pair_bytes)
    cross = node[:, None] != node[None, :]
    inter_b = float(res.pair_bytes[cross].sum())
    intra_b = float(res.pair_bytes[~cross].sum())
    # bytes that entered the network (NIC -> switch links) and left GPUs over NVLink (GPU -> NVSwitch)
    net_b = nvl_b = 0.0
    for i in np.flatnonzero(lb > 0):
        head = link_ids[i].split(">", 1)[0].rsplit(".", 1)[-1]
        if topo.link_kind[i] == "nic" and head.startswith("nic"):
            net_b += float(lb[i])
        elif topo.link_kind[i] == "nvlink" and head.startswith("gpu"):
            nvl_b += float(lb[i])
    busy = res.gpu_busy_s
    gpu_time = window * G
    compute_frac = float(busy.sum() / gpu_time) if gpu_time else 0.0
    # all-to-all time the GPUs wait for (with two micro-batches, what compute does not hide)
    comm_frac = float(res.cp["comm"] / window) if window else 0.0
    pl = prep.engine.placement
    pl_cfg = sc.policies.placement
    a2a = prep.engine.a2a
    per_layer = []
    for i, layer in enumerate(prep.model_layers):
        d = {k: float(v[i]) for k, v in res.per_layer.items()}
        per_layer.append(
            {
                "layer": int(layer),
                "trace_column": int(prep.col_src[i]),
                "hits": 0,
                "misses": 0,
                "dispatch_ms": d["dispatch_s"] * 1e3,
                "combine_ms": d["combine_s"] * 1e3,
                "experts_ms": d["experts_s"] * 1e3,
                "attention_ms": d["attention_s"] * 1e3,
                "rebalance_stall_ms": d["rebalance_stall_s"] * 1e3,
                "mean_imbalance": d["imbalance"] / n_steps if n_steps else None,
                "remote_sends": int(d["remote_sends"]),
            }
        )
    imb = res.imbalance_ratios
    ep_block = {
        "gpus": G,
        "nodes": nn,
        "gpus_per_node": topo.gpus_per_node,
        "ep": int(np.asarray(prep.engine.groups).shape[1]),
        "ep_groups": int(np.asarray(prep.engine.groups).shape[0]),
        "ep_layout": sc.parallel.ep_layout,
        "attention_tp": sc.parallel.attention_tp,
        "attention_gpus": sc.parallel.attention_gpus,
        "expert_gpus": int(np.asarray(prep.engine.groups).size),
        "tokens_per_gpu": sc.workload.batch_size,
        "tokens_per_step": R,
        "cluster": sc.cluster.name,
        "placement": {
            "policy": pl_cfg.kind if pl_cfg is not None else "contiguous",
            "slots_per_layer": int(pl.num_slots),
            "max_slots_per_gpu": int(pl.slots_per_gpu().max()),
            "replicated_experts": int(sum(int((np.bincount(pl.slot_expert[l], minlength=pl.num_experts) > 1).sum())
                                          for l in range(pl.num_layers))),
            "info": prep.initial_placement.info,
            **{k: (float(v) if isinstance(v, float) else v) for k, v in res.rebalance.items()},
        },
        "alltoall": {
            "policy": a2a.config.kind,
            "dispatch_dtype": a2a.config.dispatch_dtype,
            "combine_dtype": a2a.config.combine_dtype,
            "dispatch_ms": res.stage_s["dispatch"] * 1e3,
            "combine_ms": res.stage_s["combine"] * 1e3,
            "remote_sends": int(res.remote_sends),
            **a2a.stats(),
        },
        "stage_ms": {k: v * 1e3 for k, v in res.stage_s.items()},
        "micro_batches": sc.parallel.micro_batches,
        "attention_hardware": sc.parallel.attention_hardware,
        "efficiency": _efficiency(sc, tokens, window, G),
        "alltoall_hidden_ms": float(prep.engine.comm_hidden_s * 1e3),
        "elastic": _elastic(prep.engine.elastic_report, lat, res.warmup_steps),
        "time_split": {
            "compute": compute_frac,
            "alltoall": comm_frac,
            "idle": max(0.0, 1.0 - compute_frac - comm_frac),
        },
        "imbalance": {
            "expert_tokens_max_over_mean": float(imb.mean()) if imb.size else None,
            "expert_tokens_max_over_mean_p99": float(np.percentile(imb, 99)) if imb.size else None,
            "busy_max_over_mean": float(busy.max() / busy.mean()) if busy.mean() > 0 else None,
        },
        "per_gpu": {
            "expert_tokens": [int(x) for x in res.gpu_tokens],
            "busy_s": [float(x) for x in busy],
            "idle_s": [float(max(0.0, window - b - res.cp["comm"])) for b in busy],
            "straggler_count": [int(x) for x in res.straggler_counts],
        },
        "traffic": {
            "dispatched_bytes": float(res.dispatched_bytes),
            "combined_bytes": float(res.combined_bytes),
            "total_bytes": float(res.pair_bytes.sum()),
            "intra_node_bytes": intra_b,
            "inter_node_bytes": inter_b,
            "node_matrix_bytes": node_m.tolist(),
            "gpu_matrix_bytes": res.pair_bytes.tolist() if G <= GPU_MATRIX_MAX else None,
        },
        "links": links,
    }
    layer_steps = n_steps * L
    return {
        **run_header(sc, scenario_hash=scenario_hash, wall_time_s=wall_time_s, events=res.events,
                     sim_time_s=ends[-1], window=window, tokens=tokens, requests=R, layer_steps=layer_steps,
                     steps=n_steps, warmup_steps=res.warmup_steps, lat_s=lat),
        "cache": {
            "policy": sc.policies.cache.kind,
            "accesses": 0,
            "hits": 0,
            "misses": 0,
            "hit_rate": None,
            "prefetch_issued": 0,
            "prefetch_used": 0,
            "prefetch_wasted": 0,
            "prefetch_policy": "none",
            "evictions": 0,
            "note": "expert-parallel run: every expert resident on its GPUs, no cache",
        },
        "transfers": {
            "bytes_h2d": 0,
            "bytes_d2h": 0,
            "bytes_ssd": 0,
            "bytes_network": int(round(net_b)),
            "bytes_nvlink": int(round(nvl_b)),
            "bytes_inter_node": int(round(inter_b)),
            "bytes_intra_node": int(round(intra_b)),
            "bytes_migration": int(round(res.rebalance["migration_bytes"])),
            "copies": 0,
            "expert_bytes": int(sc.model.expert_bytes),
        },
        "routing": routing_block(sc, prep.trace),
        "utilization": util,
        "critical_path_ms": cp,
        "memory": prep.memory,
        "per_layer": per_layer,
        "expert_parallel": ep_block,
        "predictor": {"expert": prep.predictor.expert_source, "dense": "roofline"},
        "policies": {
            "cache": sc.policies.cache.kind,
            "placement": ep_block["placement"]["policy"],
            "alltoall": a2a.config.kind,
        },
        "routing_note": prep.routing_note,
    }
