"""Disaggregated prefill and decode on a cluster (DistServe, Zhong et al., OSDI 2024; Splitwise,
Patel et al., ISCA 2024; the prefill/decode split of DeepSeek-V3's deployment).

GPUs ``0..prefill_gpus-1`` form the prefill pool, the rest the decode pool; each pool is an
expert-parallel deployment of its own (the scenario's placement policy; prefill uses the
throughput-mode all-to-all ``deepep_throughput``, decode the scenario's ``policies.alltoall``).

Two levels, each where it belongs:

* **Step costs** come from the expert-parallel engine itself
  (:mod:`moesim.engine.expert_parallel`), run on each pool's GPUs with the scenario's routing:
  a decode step's time for n sequences per decode GPU (a table over n, interpolated linearly), and
  a prefill step's time for L prompt tokens per prefill GPU (a table over L: attention over the
  prompt, dense parts, experts for L tokens, throughput-mode dispatch/combine; interpolated).
* **Requests** move through a SimPy model: arrivals (the serving layer's processes) queue for the
  prefill pool; a prefill step takes up to one waiting request per prefill GPU (data-parallel
  ranks prefill whole requests) and lasts as long as the longest prompt's step; the prefill
  produces the first token; the request's KV cache (prompt x ``kv_bytes_per_token``) then moves to
  a decode GPU over the topology's links (a single flow, alone on its route: concurrent transfers
  are not made to share links here); the decode pool admits waiting requests up to
  ``workload.batch_size`` sequences per decode GPU and steps while any are active, each step giving
  every active request one token.

Stated simplifications: step times do not depend on context growth within a request (each table
entry is measured at ``workload.context_tokens``); decode GPUs are filled evenly (a step costs the
table's value at ``ceil(active / decode GPUs)``); KV memory is checked once against the largest
request (it must fit ``batch_size`` times per decode GPU, else an input error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import simpy

from moesim.errors import InputError
from moesim.serving.cluster_tables import InSystem, RoutingFile, no_cache_block, pool_scenario, step_time


@dataclass
class PdRequest:
    rid: int
    arrival: float
    prompt: int
    output: int
    prefill_start: float = -1.0
    first_token: float = -1.0
    kv_ready: float = -1.0
    decode_start: float = -1.0
    finish: float = -1.0
    tokens: int = 0  # tokens generated so far (the first comes from the prefill)
    decode_gpu: int = -1


@dataclass
class PdResult:
    requests: list
    prefill_steps: int = 0
    decode_steps: int = 0
    events: int = 0
    end_s: float = 0.0
    kv_bytes: float = 0.0
    kv_transfer_s: list = field(default_factory=list)
    decode_step_s: list = field(default_factory=list)
    decode_occupancy: list = field(default_factory=list)
    in_system_area: float = 0.0
    max_active: int = 0


class PdTables:
    """Step-time tables of the two pools, from expert-parallel runs."""

    def __init__(self, scenario, *, prefill_gpus: int, decode_gpus: int, max_prompt: int, source: str):
        wl = scenario.workload
        self.notes = [
            f"step costs from expert-parallel runs: decode pool at {decode_gpus} GPUs, prefill pool at "
            f"{prefill_gpus} GPUs (throughput-mode all-to-all), interpolated over batch and prompt length"
        ]
        B = wl.batch_size
        self.decode_n = sorted({1, *[2**k for k in range(1, 12) if 2**k < B], B})
        with RoutingFile(scenario, source) as routing:
            self._measure(scenario, routing, prefill_gpus, decode_gpus, max_prompt, source)

    def _measure(self, scenario, routing, prefill_gpus, decode_gpus, max_prompt, source):
        wl = scenario.workload
        self.decode_s = np.array([
            step_time(pool_scenario(scenario, gpus=decode_gpus, batch=n, context=wl.context_tokens,
                                    alltoall=None, steps=2, trace=routing.block, source=source), source)
            for n in self.decode_n
        ])
        hi = max(64, int(max_prompt))
        self.prefill_L = sorted({64, *[2**k for k in range(7, 16) if 2**k < hi], hi})
        tp = {"kind": "deepep_throughput"}
        # the EP run prices L prompt tokens per GPU as L one-token rows (dense parts, experts,
        # all-to-all, KV for L tokens); the causal attention over the prompt is added here: token i
        # attends to i earlier positions, L^2/2 in all, compute-bound (its KV is read once)
        from moesim.perf.predictor import Predictor

        pred = Predictor(scenario.model, scenario.hardware)
        per_ctx = scenario.model.attention_core_flops(1) / pred.flops_dense * scenario.model.num_layers
        self.prefill_s = np.array([
            step_time(pool_scenario(scenario, gpus=prefill_gpus, batch=L, context=0, alltoall=tp, steps=1,
                                    trace=routing.block, source=source), source)
            + per_ctx * L * L / 2.0
            for L in self.prefill_L
        ])

    def decode(self, n_per_gpu: float) -> float:
        return float(np.interp(n_per_gpu, self.decode_n, self.decode_s))

    def prefill(self, tokens: int) -> float:
        return float(np.interp(tokens, self.prefill_L, self.prefill_s))


def run_pd(scenario, *, source: str = "scenario"):
    """Simulate a disaggregated prefill/decode deployment; returns (summary, requests table)."""
    from moesim.network.topology import Topology
    from moesim.serving.arrivals import make_arrivals

    par, wl = scenario.parallel, scenario.workload
    cfg = wl.requests
    topo = Topology.from_spec(scenario.cluster)
    G = topo.num_gpus
    P = par.prefill_gpus
    if not 0 < P < G:
        raise InputError(f"{P} leaves no decode GPU in a {G}-GPU cluster", source=source, field="parallel.prefill_gpus")
    D = G - P
    for name in ("elastic", "attention_gpus"):
        if getattr(par, name) is not None:
            raise InputError("is not modelled together with parallel.prefill_gpus (disaggregated "
                             "prefill/decode); drop one of them", source=source, field=f"parallel.{name}")
    arr = make_arrivals(cfg, scenario.seed, source)
    if len(arr) == 0:
        raise InputError("no request arrives", source=source, field="workload.requests")
    kv_tok = scenario.model.kv_bytes_per_token
    longest = int((arr.prompt + arr.output).max())
    tables = PdTables(scenario, prefill_gpus=P, decode_gpus=D, max_prompt=int(arr.prompt.max()), source=source)
    B = wl.batch_size
    # one decode GPU holds its share of the experts and dense weights (checked by the EP runs) and
    # up to B requests' KV
    from moesim.engine.expert_parallel import check_fits

    mem = check_fits(_as_pool(scenario, B, longest), slots_per_gpu=math.ceil(scenario.model.num_experts / D),
                     steps=0, source=source)

    reqs = [PdRequest(i, float(t), int(p), int(o)) for i, (t, p, o) in enumerate(zip(arr.time_s, arr.prompt, arr.output))]
    res = PdResult(requests=reqs)
    env = simpy.Environment()
    prefill_q: list = []
    decode_q: list = []
    wake_prefill = [env.event()]
    wake_decode = [env.event()]
    active: list = []
    in_system = InSystem()

    def change(delta):
        in_system.change(env.now, delta)

    def poke(w):
        if not w[0].triggered:
            w[0].succeed()

    def arrivals():
        for r in reqs:
            yield env.timeout(max(0.0, r.arrival - env.now))
            res.events += 1
            change(+1)
            prefill_q.append(r)
            poke(wake_prefill)

    def kv_move(r, p_gpu):
        d_gpu = P + (r.rid % D)
        nbytes = r.prompt * kv_tok
        m = np.zeros((G, G))
        m[p_gpu, d_gpu] = nbytes
        t, _ = topo.collective_time(m)
        res.kv_bytes += nbytes
        res.kv_transfer_s.append(t)
        yield env.timeout(t)
        res.events += 1
        r.kv_ready = env.now
        r.decode_gpu = d_gpu
        decode_q.append(r)
        poke(wake_decode)

    def prefill_pool():
        while True:
            if not prefill_q:
                wake_prefill[0] = env.event()
                yield wake_prefill[0]
                continue
            batch = prefill_q[:P]
            del prefill_q[:P]
            for r in batch:
                r.prefill_start = env.now
            yield env.timeout(tables.prefill(max(r.prompt for r in batch)))
            res.events += 1
            res.prefill_steps += 1
            for i, r in enumerate(batch):
                r.first_token = env.now
                r.tokens = 1
                if r.tokens >= r.output:
                    r.finish = env.now
                    change(-1)
                else:
                    env.process(kv_move(r, i))

    def decode_pool():
        while True:
            while decode_q and len(active) < D * B:
                r = decode_q.pop(0)
                r.decode_start = env.now
                active.append(r)
            if not active:
                wake_decode[0] = env.event()
                yield wake_decode[0]
                continue
            n = math.ceil(len(active) / D)
            t = tables.decode(n)
            res.max_active = max(res.max_active, len(active))
            res.decode_occupancy.append(len(active))
            res.decode_step_s.append(t)
            yield env.timeout(t)
            res.events += 1
            res.decode_steps += 1
            done = []
            for r in active:
                r.tokens += 1
                if r.tokens >= r.output:
                    r.finish = env.now
                    done.append(r)
            for r in done:
                active.remove(r)
                change(-1)

    env.process(arrivals())
    env.process(prefill_pool())
    env.process(decode_pool())
    env.run()
    change(0)
    res.in_system_area = in_system.area
    res.end_s = env.now
    return res, tables, mem


def _as_pool(scenario, batch, longest):
    """The scenario as one decode GPU sees it for the memory check: ``batch`` sequences of the
    longest request's length, attention TP 1, experts over the decode pool."""
    d = scenario.model_copy(deep=True)
    d.workload = d.workload.model_copy(update={"batch_size": batch, "context_tokens": longest})
    return d


def pd_summary(scenario, res: PdResult, tables: PdTables, mem: dict, *, scenario_hash: str, wall_time_s: float):
    """``summary.json`` of a disaggregated run and its ``requests.parquet`` table."""
    import pyarrow as pa

    from moesim.metrics.summary import percentiles, run_header

    cfg = scenario.workload.requests
    rq = [r for r in res.requests if r.rid >= cfg.warmup_requests]
    fin = [r for r in rq if r.finish >= 0]
    ttft = np.array([r.first_token - r.arrival for r in fin]) * 1e3
    e2e = np.array([r.finish - r.arrival for r in fin]) * 1e3
    tpot = np.array([(r.finish - r.first_token) / (r.output - 1) for r in fin if r.output > 1]) * 1e3
    queue = np.array([r.prefill_start - r.arrival for r in fin]) * 1e3
    out_tok = int(sum(r.output for r in fin))
    # throughput and goodput count measured requests over the time from the first measured arrival
    # (as the co-located model does); time averages (in-system, critical path) cover the whole run
    t0 = min(r.arrival for r in fin) if cfg.warmup_requests and fin else 0.0
    window = res.end_s - t0
    slo = cfg.slo
    good = [r for r in fin if (r.first_token - r.arrival) * 1e3 <= slo.ttft_ms
            and (r.output <= 1 or (r.finish - r.first_token) / (r.output - 1) * 1e3 <= slo.tpot_ms)]
    P = scenario.parallel.prefill_gpus
    s = run_header(scenario, scenario_hash=scenario_hash, wall_time_s=wall_time_s, events=res.events,
                   sim_time_s=res.end_s, window=window, tokens=out_tok, requests=len(fin), layer_steps=0,
                   steps=res.decode_steps, warmup_steps=0, lat_s=np.array(res.decode_step_s))
    s["tpot_ms"] = percentiles(tpot)
    s["ttft_ms"] = percentiles(ttft)
    s["e2e_ms"] = percentiles(e2e)
    s["cache"] = no_cache_block(scenario)
    s["transfers"] = {"bytes_h2d": 0, "bytes_d2h": 0, "bytes_ssd": 0, "bytes_network": int(res.kv_bytes),
                      "bytes_kv_transfer": int(res.kv_bytes), "copies": len(res.kv_transfer_s)}
    s["utilization"] = {}
    busy_dec = float(np.sum(res.decode_step_s))
    s["critical_path_ms"] = {"gpu_compute": busy_dec * 1e3, "copy_wait": 0.0, "host": 0.0, "cpu_expert": 0.0,
                             "comm": 0.0, "idle": max(0.0, res.end_s - busy_dec) * 1e3, "total": res.end_s * 1e3}
    s["memory"] = mem
    s["per_layer"] = []
    lam = len(res.requests) / max(r.arrival for r in res.requests) if len(res.requests) > 1 else None
    s["serving"] = {
        "mode": "disaggregated prefill/decode",
        "finished_requests": len(fin),
        "output_tokens": out_tok,
        "queueing_ms": percentiles(queue),
        "goodput_req_s": len(good) / window if window > 0 else 0.0,
        "slo_met_share": len(good) / len(fin) if fin else None,
        "mean_in_system": res.in_system_area / res.end_s if res.end_s > 0 else 0.0,
        "arrival_rate_per_s": lam,
        "mean_e2e_s": float(e2e.mean() / 1e3) if len(e2e) else None,
    }
    s["disaggregated"] = {
        "prefill_gpus": P,
        "decode_gpus": int(scenario.cluster.nodes * scenario.cluster.gpus_per_node - P),
        "prefill_steps": res.prefill_steps,
        "decode_steps": res.decode_steps,
        "max_active_sequences": res.max_active,
        "mean_decode_occupancy": float(np.mean(res.decode_occupancy)) if res.decode_occupancy else 0.0,
        "kv_transfer_ms": percentiles(np.array(res.kv_transfer_s) * 1e3),
        "decode_step_table_ms": {str(n): float(t * 1e3) for n, t in zip(tables.decode_n, tables.decode_s)},
        "prefill_step_table_ms": {str(n): float(t * 1e3) for n, t in zip(tables.prefill_L, tables.prefill_s)},
    }
    s["policies"] = {"cache": scenario.policies.cache.kind, "placement": scenario.policies.placement.kind,
                     "alltoall": scenario.policies.alltoall.kind, "prefill_alltoall": "deepep_throughput"}
    s["routing_note"] = ("step costs from expert-parallel runs of each pool on the scenario's routing "
                         "(synthetic or replayed); routing is treated as independent of system choices")
    cols = {
        "request": [r.rid for r in fin], "arrival_s": [r.arrival for r in fin],
        "prefill_start_s": [r.prefill_start for r in fin], "first_token_s": [r.first_token for r in fin],
        "kv_ready_s": [r.kv_ready for r in fin], "decode_start_s": [r.decode_start for r in fin],
        "finish_s": [r.finish for r in fin], "prompt_tokens": [r.prompt for r in fin],
        "output_tokens": [r.output for r in fin], "decode_gpu": [r.decode_gpu for r in fin],
    }
    return s, pa.table(cols)
