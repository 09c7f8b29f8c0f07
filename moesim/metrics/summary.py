"""``summary.json``: every key of DESIGN 3.4, computed from an engine result in one place."""

from __future__ import annotations

import numpy as np

from moesim import __version__
from moesim.engine.single_gpu import CP_KEYS, EngineResult

SCHEMA_VERSION = 1


def percentiles(values_ms: np.ndarray) -> dict | None:
    """``{mean, p50, p90, p99}`` of ``values_ms`` (linear interpolation), or None when empty."""
    v = np.asarray(values_ms, dtype=np.float64)
    if v.size == 0:
        return None
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"mean": float(v.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def step_latencies_s(res: EngineResult) -> np.ndarray:
    """Duration of every measured decode step (seconds)."""
    ends = res.step_end_s
    starts = np.concatenate([[0.0], ends[:-1]])
    return (ends - starts)[res.warmup_steps :]


def run_header(sc, *, scenario_hash, wall_time_s, events, sim_time_s, window, tokens, requests, layer_steps,
               steps, warmup_steps, lat_s) -> dict:
    """The leading keys every summary has (DESIGN 3.4), in order; ``ttft_ms``/``e2e_ms`` null."""
    return {
        "schema_version": SCHEMA_VERSION,
        "scenario": sc.name,
        "scenario_hash": scenario_hash,
        "seed": sc.seed,
        "moesim_version": __version__,
        "wall_time_s": float(wall_time_s),
        "events_processed": int(events),
        "sim_time_s": float(sim_time_s),
        "measured_time_s": float(window),
        "tokens": int(tokens),
        "requests": int(requests),
        "layer_steps": int(layer_steps),
        "decode_steps": int(steps),
        "warmup_steps": int(warmup_steps),
        "tpot_ms": percentiles(np.asarray(lat_s) * 1e3),
        "ttft_ms": None,
        "e2e_ms": None,
        "throughput_tok_s": float(tokens / window) if window > 0 else 0.0,
    }


def window_split(res, cp_keys, window: float) -> tuple[dict, dict]:
    """``critical_path_ms`` (the measured steps' parts, one per key of ``cp_keys``, plus ``total``:
    the measured window) and ``utilization`` (each resource's busy seconds over the window) of an
    engine result with ``step_parts_s``, ``warmup_steps`` and ``busy_s``."""
    parts = res.step_parts_s[res.warmup_steps :].sum(axis=0) * 1e3
    cp = {k: float(parts[i]) for i, k in enumerate(cp_keys)}
    cp["total"] = float(window * 1e3)
    util = {k: (float(v / window) if window > 0 else 0.0) for k, v in sorted(res.busy_s.items())}
    return cp, util


def layer_cache_row(layer, column, hits: int, misses: int) -> dict:
    """The leading keys of a ``per_layer`` entry: model layer, trace column and its cache accesses."""
    return {
        "layer": int(layer),
        "trace_column": int(column),
        "accesses": hits + misses,
        "hits": hits,
        "misses": misses,
        "hit_rate": (hits / (hits + misses)) if hits + misses else None,
    }


def routing_block(sc, trace) -> dict:
    """``routing``: the scenario's routing policy and what its transform reported when the run
    applied one (:func:`moesim.engine.build.apply_routing`: the policy's stats and ``effects``);
    the same block for every engine."""
    tr = (trace.meta or {}).get("routing_transform", {})
    return {"policy": sc.policies.routing.kind, **{k: v for k, v in tr.items() if k not in ("kind", "note")}}


def _execution_block(prep, counters: dict) -> dict:
    """``{"execution": {...}}`` with an execution policy's own figures (DAOP's swaps and
    pre-calculations), or nothing for policies that report none."""
    ex = getattr(prep.engine, "execution", None)
    rep = ex.report(counters) if ex is not None and hasattr(ex, "report") else {}
    return {"execution": rep} if rep else {}


def _by_format(prep, c: dict) -> dict:
    """Per expert format (precision level): copies and bytes loaded (top-ups count towards the level
    they complete), expert-kernel GPU seconds (nominal, before copy interference) and the fraction
    of the routed gate mass it served (a quality proxy; skipped mass is the rest)."""
    lv = c.get("precision_levels")
    if lv is None:
        return {}
    pr = getattr(prep.engine, "precision", None)
    m = prep.scenario.model
    names = pr.names if pr is not None else [m.expert_dtype or m.dtype]
    total = c["gate_mass_total"]
    out = {}
    for i, name in enumerate(names):
        if pr is None:
            frac = 1.0 if c["accesses"] else None
        else:
            frac = lv["gate_mass"][i] / total if total else None
        out[name] = {"loads": int(lv["loads"][i]), "bytes_h2d": int(lv["bytes"][i]),
                     "expert_gpu_s": float(lv["expert_gpu_s"][i]), "gate_mass_fraction": frac}
    return out


def _precision_report(prep) -> dict:
    """A precision policy's own figures (EdgeMoE's offline assignment), or nothing."""
    pr = getattr(prep.engine, "precision", None)
    return pr.policy.report() if pr is not None else {}


def _by_tier(prep, c: dict) -> dict:
    """Expert loads and bytes by the tier their home copy lives in (moesim.hardware.tiers); a run
    without tiers has one home: pinned or pageable DRAM, or storage."""
    t = c.get("tiers")
    if t is not None:
        return {n: {"loads": int(t["loads"][i]), "bytes": int(t["bytes"][i])}
                for i, n in enumerate(("pinned", "pageable", "ssd"))}
    home = "ssd" if prep.memory.get("expert_store") == "ssd" else prep.scenario.runtime.host_memory
    return {home: {"loads": int(c["copies"]), "bytes": int(c.get("bytes_h2d_experts", 0))}}


def build_summary(prep, res: EngineResult, *, scenario_hash: str, wall_time_s: float) -> dict:
    """The summary dict of one run (JSON-able; deterministic apart from ``wall_time_s``)."""
    sc = prep.scenario
    B = res.batch_size
    lat = step_latencies_s(res)
    measured_steps = len(lat)
    window = float(res.step_end_s[-1] - res.measure_start_s)
    tokens = measured_steps * B
    c = res.counters
    acc = c["accesses"]
    cp, util = window_split(res, CP_KEYS, window)
    per_layer = []
    pc = res.per_column
    for i, layer in enumerate(prep.model_layers):
        h, m_ = int(pc["hits"][i]), int(pc["misses"][i])
        per_layer.append(
            {
                **layer_cache_row(layer, prep.col_src[i], h, m_),
                "loads": int(pc["loads"][i]),
                "streamed": int(pc["streamed"][i]),
                "cpu_executed": int(pc["cpu_experts"][i]),
                "evictions": int(pc["evictions"][i]),
                "routed_tokens": int(pc["routed_tokens"][i]),
                "mean_tokens_per_expert": (
                    float(pc["routed_tokens"][i] / pc["distinct_experts"][i]) if pc["distinct_experts"][i] else None
                ),
            }
        )
    summary = {
        **run_header(sc, scenario_hash=scenario_hash, wall_time_s=wall_time_s, events=res.events,
                     sim_time_s=res.step_end_s[-1], window=window, tokens=tokens, requests=B,
                     layer_steps=measured_steps * len(prep.model_layers), steps=measured_steps,
                     warmup_steps=res.warmup_steps, lat_s=lat),
        "cache": {
            "policy": sc.policies.cache.kind,
            "accesses": int(acc),
            "hits": int(c["hits"]),
            "misses": int(c["misses"]),
            "hit_rate": float(c["hits"] / acc) if acc else None,
            "streamed": int(c["streamed"]),
            "cpu_executed": int(c["cpu_experts"]),
            "prefetch_issued": int(c["prefetch_issued"]),
            "prefetch_used": int(c["prefetch_used"]),
            "prefetch_wasted": int(c["prefetch_wasted"]),
            "prefetch_policy": sc.policies.prefetch.kind,
            "prefetch_precision": (
                c["prefetch_predicted_right"] / c["prefetch_predicted"] if c["prefetch_predicted"] else None
            ),
            "prefetch_recall": (c["prefetch_predicted_right"] / c["prefetch_truth"] if c["prefetch_truth"] else None),
            "evictions": int(c["evictions"]),
            "slots": int(prep.engine.cache.slots_total()),
        },
        "transfers": {
            "bytes_h2d": int(c["bytes_h2d"]),
            "bytes_h2d_experts": int(c["bytes_h2d_experts"]),
            "bytes_h2d_dense": int(c["bytes_h2d_dense"]),
            "dense_copies": int(c["dense_copies"]),
            "bytes_d2h": int(c["bytes_d2h"]),
            "bytes_ssd": int(c["bytes_ssd"]),
            "bytes_network": 0,
            "copies": int(c["copies"]),
            "expert_bytes": int(sc.model.expert_bytes),
            "by_tier": _by_tier(prep, c),
        },
        "precision": {
            "policy": sc.policies.precision.kind,
            "low_precision_loads": int(c["low_precision_loads"]),
            "skipped": int(c["skipped"]),
            "gate_mass_total": float(c["gate_mass_total"]),
            "gate_mass_low_fraction": (c["gate_mass_low"] / c["gate_mass_total"]) if c["gate_mass_total"] else None,
            "gate_mass_skipped_fraction": (
                c["gate_mass_skipped"] / c["gate_mass_total"] if c["gate_mass_total"] else None
            ),
            "topups": int(c.get("precision_levels", {}).get("topups", 0)),
            "bytes_topup": int(c.get("precision_levels", {}).get("bytes_topup", 0)),
            "dequant": sc.runtime.dequant,
            "by_format": _by_format(prep, c),
            **_precision_report(prep),
        },
        "routing": routing_block(sc, prep.trace),
        "utilization": util,
        "critical_path_ms": cp,
        "memory": prep.memory,
        "per_layer": per_layer,
        "predictor": {
            "expert": prep.predictor.expert_source,
            "cpu_expert": prep.predictor.cpu_expert_source,
            "dense": "roofline",
        },
        "policies": {fam: getattr(sc.policies, fam).kind for fam in ("cache", "prefetch", "execution", "precision")},
        **_execution_block(prep, c),
        "routing_note": prep.routing_note,
    }
    if getattr(prep, "serving", None) is not None:
        from moesim.serving.metrics import serving_summary

        # a serving run: request latencies replace the fixed batch's step latencies
        summary.update(serving_summary(prep, res))
        summary["policies"]["batching"] = sc.policies.batching.kind
    return summary
