"""Requests served by a co-located expert-parallel cluster: every GPU runs attention and experts,
or attention and experts on separate pools (attention-FFN disaggregation, MegaScale-Infer: Zhu et
al. 2025, arXiv:2504.02263), optionally scaling from one GPU count to another while it serves
(ElasticMoE, arXiv:2510.02613).

Two levels, as in :mod:`moesim.serving.pd_disagg` (the shared part is
:mod:`moesim.serving.cluster_tables`):

* **Step costs** come from the expert-parallel engine: a table
  (:class:`~moesim.serving.cluster_tables.EpStepTable`) of the deployment's step time with ``n``
  tokens on every data-parallel attention rank, as ``a(n) + b(n) x context``; its runs use the
  scenario's placement, all-to-all, micro-batches and attention pool.
* **Requests** move through a SimPy model. Each data-parallel attention rank (``attention_tp``
  GPUs; with ``attention_gpus`` only the attention pool has ranks) has its own serving scheduler
  (:class:`~moesim.serving.scheduler.Scheduler`: the scenario's batching policy, its KV blocks and
  pre-emption, as a DP-attention server gives every rank its own scheduler). An arriving request
  goes to the rank with the fewest requests (running + waiting; lowest index on ties). All ranks
  step together, since every MoE layer's all-to-all joins them: at each step every rank's policy
  forms its work, and the step lasts as long as the busiest rank's cost
  ``a(n_r) + b(n_r) x D_r / n_r + q x Q_r``, where ``n_r`` is its tokens, ``D_r`` the KV positions
  its decode tokens read, ``Q_r`` the (position, earlier position) pairs of its prefill chunks
  (causal: token i of a chunk attends to the chunk's earlier tokens and the KV before it) and ``q``
  the compute time of one such pair over all layers.

Choices the model makes (stated, not hidden):

* a rank's cost is priced as if every rank carried its load (the table measures equal ranks): the
  expert side of a step whose other ranks are lighter is over-priced, an upper bound;
* prefill tokens are priced as the table's rows at context 0 (dense parts, experts, the
  deployment's all-to-all for that many tokens) plus the causal attention above, on the same
  GPUs; the deployment's one all-to-all kernel serves prefill and decode alike;
* the table interpolates linearly in ``n`` between its grid points (1, powers of two, the largest
  step a rank's policy can form);
* requests' routing is not replayed step by step: the table's runs use the scenario's trace;
* **elastic** (``parallel.elastic``): ``at_step`` counts serving steps. Before it the deployment is
  GPUs ``0..start_gpus-1``, after it ``0..end_gpus-1`` (each a table of its own). The step at
  ``at_step`` first waits for the host's planning (``planning_ms``) and, on scale-down, for the KV
  caches of the leaving ranks' running requests moving to the remaining ranks (fewest requests
  first; a request the target's KV budget cannot hold is pre-empted there and recomputed), then
  runs with every MoE layer waiting for the experts its GPUs gain — the copy time the
  expert-parallel engine's own scale event gives for the same GPU counts and routing. The copies
  start when the event ends; if no rank has work then, the first step that runs waits only for
  what is left of them. On scale-up running requests keep their ranks and the waiting ones are
  dealt again over all ranks.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import simpy

from moesim.errors import InputError
from moesim.serving.cluster_tables import EpStepTable, InSystem, RoutingFile, no_cache_block, pool_scenario, run_pool
from moesim.serving.scheduler import KvState, Scheduler

GIB = 2**30


class RankScheduler(Scheduler):
    """The serving scheduler of one data-parallel attention rank: requests are handed to it by the
    cluster's dispatcher (:meth:`give`), not taken from an arrival list of its own."""

    def __init__(self, rank: int, *, policy, kv, kv_policy: str, warmup: int, all_arrived: list):
        super().__init__(requests=[], policy=policy, kv=kv, kv_policy=kv_policy, plan=None, table=None,
                         warmup_requests=warmup)
        self.rank = rank
        self._all_arrived = all_arrived  # one shared flag: [bool]

    @property
    def arrivals_done(self) -> bool:
        return self._all_arrived[0]

    def _take_arrivals(self, now: float) -> None:  # the dispatcher has put them in ``waiting``
        return None

    def give(self, req) -> None:
        """Queue ``req`` here (it holds no KV)."""
        self.waiting.append(req)

    @property
    def load(self) -> int:
        """Requests on this rank (running + waiting)."""
        return len(self.running) + len(self.waiting)

    def take_running(self, req) -> None:
        """Adopt running ``req`` with its KV blocks (moved from another rank)."""
        kv = self.kv
        kv.used += req.kv_blocks
        kv.reserved += req.reserved_blocks
        bisect.insort(self.running, req, key=lambda r: r.id)

    def release_running(self, req) -> None:
        """Give up running ``req`` (its KV leaves with it)."""
        kv = self.kv
        kv.used -= req.kv_blocks
        kv.reserved -= req.reserved_blocks
        self.running.remove(req)


@dataclass
class ClusterServingResult:
    """Raw outcome of a co-located cluster serving run."""

    requests: list
    ranks_before: int
    ranks_after: int
    step_start: list = field(default_factory=list)
    step_s: list = field(default_factory=list)
    step_tokens: list = field(default_factory=list)  # tokens of the whole step (all ranks)
    step_samples: list = field(default_factory=list)  # output tokens the step produced
    step_prefill: list = field(default_factory=list)
    step_max_rank_tokens: list = field(default_factory=list)
    step_imbalance: list = field(default_factory=list)  # busiest rank's tokens / mean over ranks
    events: int = 0
    end_s: float = 0.0
    in_system_area: float = 0.0
    elastic: dict | None = None
    stall_s: float = 0.0  # expert copy + KV move stalls (elastic)
    copy_in_steps_s: float = 0.0  # the part of stall_s inside a step (expert copies)
    planning_s: float = 0.0


class ClusterServing:
    """Build the tables, the ranks and the requests of a co-located serving run; :meth:`run` it."""

    def __init__(self, scenario, source: str = "scenario"):
        from moesim.network.topology import Topology
        from moesim.policies.base import registry
        from moesim.policies.batching.base import BatchingSetup
        from moesim.serving.arrivals import make_arrivals
        from moesim.serving.requests import build_requests

        self.scenario, self.source = scenario, source
        sc, par, wl = scenario, scenario.parallel, scenario.workload
        cfg = wl.requests
        self.topo = Topology.from_spec(sc.cluster)
        G = self.G = self.topo.num_gpus
        t = self.t = par.attention_tp
        el = par.elastic
        M = par.attention_gpus
        if el is not None:
            if M is not None or par.ep is not None:
                raise InputError("elastic scaling works with one EP group over all active GPUs (no attention_gpus, "
                                 "no ep)", source=source, field="parallel.elastic")
            self.gpus_before, self.gpus_after = el.start_gpus, el.end_gpus or G
            for fld, n in (("start_gpus", self.gpus_before), ("end_gpus", self.gpus_after)):
                if not t <= n <= G or n % t:
                    raise InputError(f"{n} must be a multiple of attention_tp within the cluster's {G} GPUs",
                                     source=source, field=f"parallel.elastic.{fld}")
            if self.gpus_before == self.gpus_after:
                raise InputError("end_gpus equals start_gpus: nothing to scale", source=source,
                                 field="parallel.elastic.end_gpus")
        else:
            self.gpus_before = self.gpus_after = G
        if M is not None and not 0 < M < G:
            raise InputError(f"{M} leaves no GPU for the experts of a {G}-GPU cluster", source=source,
                             field="parallel.attention_gpus")
        A = M if M is not None else None
        if (A or G) % t:
            raise InputError(f"{t} does not divide the {A or G} attention GPUs", source=source,
                             field="parallel.attention_tp")
        self.ranks_before = (A or self.gpus_before) // t
        self.ranks_after = (A or self.gpus_after) // t

        arr = make_arrivals(cfg, sc.seed, source)
        if len(arr) == 0:
            raise InputError("no request arrives", source=source, field="workload.requests")
        with RoutingFile(sc, source) as routing:
            self.requests, self.notes, self.routing_rows = build_requests(arr, routing.trace, cfg, sc.seed, source)
            self.arrivals = arr
            sizes = sorted((r.positions for r in self.requests), reverse=True)
            self.longest = sizes[0]
            bcfg = sc.policies.batching
            kind = registry("batching")[bcfg.kind]
            experts = np.asarray(routing.trace.experts)
            self.policies = [kind(bcfg, BatchingSetup(batch_size=wl.batch_size, prefill_sizes=tuple(sizes),
                                                      source=source, experts=experts))
                             for _ in range(max(self.ranks_before, self.ranks_after))]
            max_step = max(1, int(self.policies[0].max_step_tokens()))
            el_par = {"elastic": None}
            self.table_before = EpStepTable(
                sc, gpus=self.gpus_before if el is not None else G, max_tokens=max_step, max_context=self.longest,
                routing=routing, source=source, parallel=el_par, kv_room_tokens=self._kv_room_tokens,
                points=cfg.cluster_table_tokens)
            self.table_after = self.table_before
            self.scale_copy = None
            if el is not None:
                self.table_after = EpStepTable(
                    sc, gpus=self.gpus_after, max_tokens=max_step, max_context=self.longest, routing=routing,
                    source=source, parallel=el_par, kv_room_tokens=self._kv_room_tokens,
                    points=cfg.cluster_table_tokens)
                self.scale_copy = self._scale_copy(routing)
        self.memory = dict(self.table_before.memory)
        # KV budget of one rank: what its GPUs have left after dense weights and expert slots
        mems = [self.table_before.memory, self.table_after.memory]
        room = min(self._kv_room_bytes(m) for m in mems)
        budget = room * sc.model.kv_tp_shards(t)  # the rank's KV is split over this many of its t GPUs
        if cfg.kv_cache_gib is not None:
            budget = min(budget, cfg.kv_cache_gib * GIB)
        self.kv_budget = int(max(0, budget))
        self.memory["kv_budget_bytes_per_rank"] = self.kv_budget
        kv_tok = sc.model.kv_bytes_per_token
        probe = KvState(budget_bytes=self.kv_budget, bytes_per_token=kv_tok, block_tokens=cfg.kv_block_tokens)
        if probe.blocks(self.longest) > probe.budget_blocks:
            raise InputError(
                f"the longest request ({self.longest} token positions) needs "
                f"{probe.blocks(self.longest) * probe.block_bytes / GIB:.3f} GiB of KV, more than one rank's KV "
                f"budget of {self.kv_budget / GIB:.3f} GiB: it could never run",
                source=source,
                field="workload.requests.kv_cache_gib" if cfg.kv_cache_gib is not None else "workload.requests")
        # causal attention of prefill chunks: seconds per (token, earlier position) pair, all layers
        from moesim.perf.predictor import Predictor

        hw = sc.hardware
        if par.attention_hardware is not None:
            from moesim.hardware.presets import load_hardware_preset
            from moesim.hardware.spec import HardwareSpec

            hw = HardwareSpec.model_validate(load_hardware_preset(par.attention_hardware))
        pred = Predictor(sc.model, hw)
        self.pair_s = sc.model.attention_core_flops(1) / pred.flops_dense * sc.model.num_layers / t

    # ----- memory --------------------------------------------------------------------------------------
    def _usable_attention(self, mem: dict) -> float:
        par = self.scenario.parallel
        if par.attention_hardware is None:
            return float(mem["gpu_usable_bytes"])
        from moesim.hardware.presets import load_hardware_preset
        from moesim.hardware.spec import HardwareSpec

        g = HardwareSpec.model_validate(load_hardware_preset(par.attention_hardware)).gpu
        return (g.hbm_gib - g.reserved_gib) * GIB

    def _kv_room_bytes(self, mem: dict) -> float:
        """KV bytes one GPU of a rank can hold next to its dense weights (and, co-located, its experts)."""
        if self.scenario.parallel.attention_gpus is not None:
            return self._usable_attention(mem) - mem["dense_bytes"]
        return mem["gpu_usable_bytes"] - mem["dense_bytes"] - mem["expert_bytes"]

    def _kv_room_tokens(self, mem: dict) -> int:
        """Token positions per data-parallel GPU slot of a rank (``n`` sequences of context ``c``
        fit when ``n * c`` is at most this): one GPU's room, times the GPUs the rank's KV is split
        over, per attention-TP GPU."""
        sc = self.scenario
        t = sc.parallel.attention_tp
        per = max(1, sc.model.kv_bytes_per_token) * t / sc.model.kv_tp_shards(t)
        return int(self._kv_room_bytes(mem) // per)

    # ----- elastic -------------------------------------------------------------------------------------
    def _scale_copy(self, routing) -> dict:
        """Expert copy stall and planning time of the engine's own scale event at these GPU counts
        (one sequence per rank, the placement before it profiled on ``steps`` steps as the tables)."""
        sc = self.scenario
        el = sc.parallel.elastic
        S = self.table_before.steps
        d = pool_scenario(sc, gpus=self.G, batch=1, context=0, alltoall=None, steps=1,
                          parallel={"elastic": {"start_gpus": el.start_gpus, "end_gpus": el.end_gpus, "at_step": S,
                                                "planning_ms": el.planning_ms}, "micro_batches": 1},
                          trace=routing.block, source=self.source)
        # rows: S steps before, one after (scale-down: the same sequences, on fewer GPUs)
        d["workload"]["max_tokens"] = S * self.ranks_before + max(self.ranks_before, self.ranks_after)
        rep = run_pool(d, self.source)["expert_parallel"]["elastic"]
        return {"stall_s": rep["stall_ms"] * 1e-3, "planning_s": rep["planning_ms"] * 1e-3,
                "moved_experts": rep["moved_experts"], "migration_bytes": rep["migration_bytes"]}

    # ----- the request-level model ---------------------------------------------------------------------
    def step_cost(self, table, items) -> tuple[float, int]:
        """Seconds of one rank's work ``items`` on a deployment priced by ``table``, and its tokens."""
        n = 0
        dec_ctx = 0.0
        pairs = 0.0
        for _r, k, pre, kv0 in items:
            n += k
            if pre:
                pairs += k * kv0 + k * (k - 1) / 2.0
            else:
                dec_ctx += kv0
        return table.time(n, dec_ctx / n) + self.pair_s * pairs, n

    def run(self) -> ClusterServingResult:
        sc = self.scenario
        cfg = sc.workload.requests
        kv_tok = sc.model.kv_bytes_per_token
        all_arrived = [False]
        ranks = [RankScheduler(k, policy=self.policies[k],
                               kv=KvState(budget_bytes=self.kv_budget, bytes_per_token=kv_tok,
                                          block_tokens=cfg.kv_block_tokens),
                               kv_policy=cfg.kv_policy, warmup=cfg.warmup_requests, all_arrived=all_arrived)
                 for k in range(max(self.ranks_before, self.ranks_after))]
        self.rank_scheds = ranks
        active = [self.ranks_before]
        reqs = self.requests
        res = ClusterServingResult(requests=reqs, ranks_before=self.ranks_before, ranks_after=self.ranks_after)
        env = simpy.Environment()
        insys = InSystem()
        wake = [env.event()]
        finished = [0]
        el = sc.parallel.elastic
        table = [self.table_before]
        copies = [None]  # (start s, duration s) of the scale event's expert copies, until a step waits

        def dispatch(r):
            k = min(range(active[0]), key=lambda i: (ranks[i].load, i))
            ranks[k].give(r)

        def arrivals():
            for i, r in enumerate(reqs):
                yield env.timeout(max(0.0, r.arrival - env.now))
                res.events += 1
                insys.change(env.now, +1)
                dispatch(r)
                if i == len(reqs) - 1:
                    all_arrived[0] = True
                if not wake[0].triggered:
                    wake[0].succeed()

        def scale():
            """Switch deployments before step ``at_step``; returns when the expert copies start and
            how long they take (s)."""
            t0 = env.now
            cp = self.scale_copy
            if cp["planning_s"] > 0:
                yield env.timeout(cp["planning_s"])
                res.events += 1
            before, after = self.ranks_before, self.ranks_after
            for k in range(before):
                ranks[k].in_step = set()  # the last step's ids: nothing is being formed now
            kv_m = np.zeros((self.G, self.G))
            moved = preempted = 0
            if after < before:
                active[0] = after
                for k in range(after, before):
                    src = ranks[k]
                    for r in list(src.running):
                        dst = min(range(after), key=lambda i: (ranks[i].load, i))
                        tgt = ranks[dst]
                        fits = (tgt.kv.used + r.kv_blocks <= tgt.kv.budget_blocks
                                and (cfg.kv_policy != "wait" or tgt.kv.reserved + r.reserved_blocks
                                     <= tgt.kv.budget_blocks))
                        if fits:
                            kv_m[k * self.t, dst * self.t] += r.kv_tokens * kv_tok
                            src.release_running(r)
                            tgt.take_running(r)
                            moved += 1
                        else:  # no room there: its KV is dropped, it is recomputed on the target
                            src._preempt(r)
                            src.waiting.remove(r)
                            tgt.waiting.appendleft(r)
                            preempted += 1
                    for r in list(src.waiting):
                        src.waiting.remove(r)
                        dispatch(r)
            else:
                active[0] = after
                waiting = sorted((r for k in range(before) for r in ranks[k].waiting), key=lambda r: r.id)
                for k in range(before):
                    ranks[k].waiting.clear()
                for r in waiting:
                    dispatch(r)
            kv_s = self.topo.collective_time(kv_m)[0] if kv_m.any() else 0.0
            if kv_s > 0:
                yield env.timeout(kv_s)
                res.events += 1
            table[0] = self.table_after
            res.elastic = {
                "at_step": el.at_step, "at_s": t0, "direction": "up" if after > before else "down",
                "gpus_before": self.gpus_before, "gpus_after": self.gpus_after,
                "ranks_before": before, "ranks_after": after,
                "planning_ms": cp["planning_s"] * 1e3, "expert_copy_stall_ms": cp["stall_s"] * 1e3,
                "moved_experts": int(cp["moved_experts"]), "migration_bytes": float(cp["migration_bytes"]),
                "kv_moved_requests": moved, "kv_moved_bytes": float(kv_m.sum()), "kv_stall_ms": kv_s * 1e3,
                "preempted_on_move": preempted,
                "disruption_ms": (cp["planning_s"] + kv_s + cp["stall_s"]) * 1e3,
            }
            res.planning_s += cp["planning_s"]
            res.stall_s += kv_s  # the copy stall is booked by the step that waits for it
            return env.now, cp["stall_s"]  # the expert copies start now and take stall_s

        def loop():
            step = 0
            n_req = len(reqs)
            while finished[0] < n_req:
                extra = 0.0
                if el is not None and step == el.at_step and res.elastic is None:
                    copies[0] = yield from scale()
                work = [(k, ranks[k].form_items(env.now)) for k in range(active[0])]
                work = [(k, items) for k, items in work if items]
                if not work:
                    wake[0] = env.event()
                    yield wake[0]
                    continue
                if copies[0] is not None:  # the first step after the event waits for what is left of
                    c0, cs = copies[0]  # the expert copies (all of it unless the pool sat idle)
                    extra = cs if env.now == c0 else max(0.0, c0 + cs - env.now)
                    copies[0] = None
                    res.stall_s += extra
                    res.copy_in_steps_s += extra
                costs = [self.step_cost(table[0], items) for _, items in work]
                dt = max(c for c, _ in costs) + extra
                toks = [n for _, n in costs]
                t0 = env.now
                yield env.timeout(dt)
                res.events += 1
                now = env.now
                samples = prefill = 0
                for k, items in work:
                    sch = ranks[k]
                    if sch.kv.used > sch.kv.peak:
                        sch.kv.peak = sch.kv.used
                    for r, kk, pre, kv0 in items:
                        if pre:
                            prefill += kk
                            if kv0 + kk >= r.target:
                                samples += 1
                        else:
                            samples += 1
                    before = sch.finished
                    sch.step = SimpleNamespace(items=items)
                    sch.finish_step(now)
                    for _ in range(sch.finished - before):
                        insys.change(now, -1)
                    finished[0] += sch.finished - before
                res.step_start.append(t0)
                res.step_s.append(dt)
                res.step_tokens.append(int(sum(toks)))
                res.step_samples.append(samples)
                res.step_prefill.append(prefill)
                res.step_max_rank_tokens.append(max(toks))
                res.step_imbalance.append(max(toks) / (sum(toks) / active[0]))
                step += 1

        env.process(arrivals())
        env.process(loop())
        env.run()
        insys.change(env.now, 0)
        res.in_system_area = insys.area
        res.end_s = env.now
        lost = [r.id for r in reqs if r.finish < 0]
        if lost:  # pragma: no cover - every request runs to its end
            raise RuntimeError(f"requests never finished: {lost[:5]}")
        return res


def _gpu_seconds(c: ClusterServing, res: ClusterServingResult, t0: float, t1: float) -> float:
    """GPU-seconds held in ``[t0, t1]`` (elastic: the pool before, then after the scale event)."""
    G_before = c.gpus_before if c.scenario.parallel.elastic is not None else c.G
    if res.elastic is None:
        return G_before * (t1 - t0)
    ts = min(max(res.elastic["at_s"], t0), t1)
    return G_before * (ts - t0) + c.gpus_after * (t1 - ts)


def cluster_serving_summary(c: ClusterServing, res: ClusterServingResult, *, scenario_hash: str,
                            wall_time_s: float):
    """``summary.json`` of a co-located serving run and its ``requests.parquet`` table."""
    from moesim.metrics.summary import percentiles, run_header
    from moesim.serving.metrics import request_arrays, requests_table

    sc = c.scenario
    cfg = sc.workload.requests
    par = sc.parallel
    view = SimpleNamespace(requests=res.requests, warmup=cfg.warmup_requests)
    a = request_arrays(view, cfg.slo)
    m = a["measured"] & a["finished"]
    nm = int(m.sum())
    t0 = 0.0 if cfg.warmup_requests == 0 else (float(a["arrival_s"][m].min()) if nm else 0.0)
    window = res.end_s - t0
    out_tok = int(a["output_tokens"][m].sum())
    good = a["slo_met"] & m
    itl = np.concatenate([np.asarray(r.stats.itl_s) for r in c.rank_scheds]) if c.rank_scheds else np.array([])
    steps = len(res.step_s)
    L = len(sc.model.moe_layers)
    s = run_header(sc, scenario_hash=scenario_hash, wall_time_s=wall_time_s, events=res.events, sim_time_s=res.end_s,
                   window=window, tokens=out_tok, requests=len(res.requests), layer_steps=steps * L, steps=steps,
                   warmup_steps=0, lat_s=np.array(res.step_s))
    tpot_req = a["tpot_ms"][m]
    tpot_req = tpot_req[~np.isnan(tpot_req)]
    s["tpot_ms"] = percentiles(itl * 1e3)
    s["ttft_ms"] = percentiles(a["ttft_ms"][m])
    s["e2e_ms"] = percentiles(a["e2e_ms"][m])
    s["cache"] = no_cache_block(sc)
    kv_moved = res.elastic["kv_moved_bytes"] if res.elastic else 0.0
    mig = res.elastic["migration_bytes"] if res.elastic else 0.0
    s["transfers"] = {"bytes_h2d": 0, "bytes_d2h": 0, "bytes_ssd": 0, "bytes_network": int(kv_moved + mig),
                      "bytes_kv_transfer": int(kv_moved), "bytes_migration": int(mig), "copies": 0}
    s["utilization"] = {}
    busy = float(np.sum(res.step_s)) - res.copy_in_steps_s
    s["critical_path_ms"] = {"gpu_compute": busy * 1e3, "copy_wait": res.stall_s * 1e3, "host": res.planning_s * 1e3,
                             "cpu_expert": 0.0, "comm": 0.0,
                             "idle": max(0.0, res.end_s - busy - res.stall_s - res.planning_s) * 1e3,
                             "total": res.end_s * 1e3}
    s["memory"] = c.memory
    s["per_layer"] = []
    stok = np.asarray(res.step_tokens)
    spre = np.asarray(res.step_prefill)
    peaks = [r.kv.peak for r in c.rank_scheds]
    kv0 = c.rank_scheds[0].kv
    last_arrival = float(a["arrival_s"].max())
    arr = cfg.arrival
    pre_n = int(sum(r.stats.preemptions for r in c.rank_scheds))
    s["serving"] = {
        "mode": "attention-FFN disaggregated" if par.attention_gpus is not None else "co-located expert parallel",
        "batching": sc.policies.batching.kind,
        "kv_policy": cfg.kv_policy,
        "arrival": arr.kind,
        "rate_per_s": getattr(arr, "rate_per_s", None),
        "routing_rows": c.routing_rows,
        "requests": len(res.requests),
        "finished_requests": int(a["finished"].sum()),
        "measured_requests": nm,
        "warmup_requests": int(cfg.warmup_requests),
        "queue_ms": percentiles(a["queue_ms"][m]),
        "tpot_per_request_ms": percentiles(tpot_req),
        "throughput_req_s": nm / window if window > 0 else 0.0,
        "throughput_tok_s": out_tok / window if window > 0 else 0.0,
        "arrival_rate_per_s": (len(res.requests) / last_arrival) if last_arrival > 0 else None,
        "mean_in_system": res.in_system_area / res.end_s if res.end_s > 0 else 0.0,
        "mean_e2e_s": float(a["e2e_ms"][a["finished"]].mean() / 1e3),
        "slo": {"ttft_ms": cfg.slo.ttft_ms, "tpot_ms": cfg.slo.tpot_ms},
        "slo_attainment": float(good.sum() / nm) if nm else None,
        "goodput_req_s": float(good.sum() / window) if window > 0 else 0.0,
        "goodput_tok_s": float(a["output_tokens"][good].sum() / window) if window > 0 else 0.0,
        "preemptions": pre_n,
        "recomputed_tokens": int(a["recomputed_tokens"].sum()),
        "steps": steps,
        "prefill_steps": int((spre > 0).sum()),
        "mixed_steps": int(((spre > 0) & (spre < stok)).sum()),
        "mean_step_tokens": float(stok.mean()) if steps else 0.0,
        "kv": {
            "budget_bytes": int(c.kv_budget),
            "budget_blocks": int(kv0.budget_blocks),
            "block_tokens": int(kv0.block_tokens),
            "bytes_per_token": int(kv0.bytes_per_token),
            "peak_bytes": int(max(peaks) * kv0.block_bytes),
            "peak_fraction": float(max(peaks) / kv0.budget_blocks) if kv0.budget_blocks else 0.0,
            "note": "per attention rank; peak over ranks",
        },
    }
    gpu_s = _gpu_seconds(c, res, t0, res.end_s)
    eff = {"tokens_per_s_per_gpu": out_tok / gpu_s if gpu_s > 0 else 0.0, "gpu_seconds": gpu_s}
    if par.gpu_cost_per_hour is not None:
        M = par.attention_gpus or 0
        a_price = par.attention_gpu_cost_per_hour or par.gpu_cost_per_hour
        G = c.G
        per_gpu_hour = ((G - M) * par.gpu_cost_per_hour + M * a_price) / G if M else par.gpu_cost_per_hour
        dollars = gpu_s * per_gpu_hour / 3600.0
        eff["tokens_per_dollar"] = out_tok / dollars if dollars > 0 else 0.0
    s["cluster_serving"] = {
        "gpus": c.G,
        "attention_gpus": par.attention_gpus,
        "attention_tp": par.attention_tp,
        "micro_batches": par.micro_batches,
        "ranks": c.ranks_before if res.elastic is None else {"before": c.ranks_before, "after": c.ranks_after},
        "step_ms": percentiles(np.asarray(res.step_s) * 1e3),
        "mean_busiest_rank_tokens": float(np.mean(res.step_max_rank_tokens)) if steps else 0.0,
        "mean_rank_imbalance": float(np.mean(res.step_imbalance)) if steps else None,
        "efficiency": eff,
        "step_table": c.table_before.as_dict(),
        "step_table_after": c.table_after.as_dict() if c.table_after is not c.table_before else None,
        "elastic": _elastic_block(res),
    }
    s["policies"] = {"cache": sc.policies.cache.kind, "placement": (sc.policies.placement.kind
                     if sc.policies.placement is not None else "contiguous"),
                     "alltoall": sc.policies.alltoall.kind if sc.policies.alltoall is not None else "direct",
                     "batching": sc.policies.batching.kind}
    s["routing_note"] = ("step costs from expert-parallel runs of the deployment on the scenario's routing "
                         "(synthetic or replayed); requests' own rows are not replayed step by step; routing is "
                         "treated as independent of system choices")
    return s, requests_table(view, cfg.slo)


def _elastic_block(res: ClusterServingResult) -> dict | None:
    """The scale event's report with output-token throughput before and after it."""
    if res.elastic is None:
        return None
    d = dict(res.elastic)
    k = d["at_step"]
    start = np.asarray(res.step_start)
    dur = np.asarray(res.step_s)
    smp = np.asarray(res.step_samples)

    def rate(sel):
        t = dur[sel].sum()
        return float(smp[sel].sum() / t) if t > 0 else None

    d["step_ms_at_scale"] = float(dur[k] * 1e3) if k < len(dur) else None
    d["tok_s_before"] = rate(slice(0, k))
    d["tok_s_after"] = rate(slice(k + 1, None))
    d["steps_after"] = int(max(0, len(dur) - k - 1))
    d["step_start_s_at_scale"] = float(start[k]) if k < len(start) else None
    return d


def run_cluster_serving(scenario, *, source: str = "scenario"):
    """Build and run a co-located serving scenario; returns (builder, result)."""
    c = ClusterServing(scenario, source)
    return c, c.run()


__all__ = ["ClusterServing", "ClusterServingResult", "RankScheduler", "cluster_serving_summary",
           "run_cluster_serving"]
