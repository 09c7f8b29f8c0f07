"""Expert-parallel decode on a cluster of GPUs: placement, dispatch, expert compute, combine.

Every GPU serves ``workload.batch_size`` sequences (data-parallel attention; with
``parallel.attention_tp = t`` a group of t GPUs shares the attention of t x batch sequences and
splits their tokens for the MoE part). The experts of each MoE layer are spread over an
expert-parallel (EP) group of GPUs by the placement policy (replicas allowed); every EP group
holds a full copy of the experts. One decode step runs, for every MoE layer in model order:

1. **attention and the dense parts** (projections, router, shared experts) on every GPU;
2. **dispatch**: each token travels to the GPUs that serve its top-k experts (all-to-all policy);
3. **expert compute**: every GPU runs its experts for the tokens it received, one grouped GEMM
   (time by token count from the predictor, summed over its experts);
4. **combine**: the partial outputs travel back.

The collectives synchronise the GPUs, so each stage ends when its slowest GPU does: imbalance comes
from the trace (how many tokens each GPU's experts receive), not from an assumption. Per-expert
arithmetic is numpy; the host loop spends one SimPy event per (step, layer, stage) and one per
step. Rows of the trace are consumed in order, ``tokens per step = DP ranks x batch``; with
``workload.loop_trace`` the trace is replayed from its start when it runs out (the windows of
consecutive steps then shift through it).

Placement changes (``policies.placement.rebalance_every_steps``) are paid for: the planning time
on the host, then every layer stalls before its experts run while the experts it gains are copied
from GPUs that hold them, over the topology's links.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy

from moesim.errors import InputError

GIB = 2**30
STAGES = ("attention", "dispatch", "experts", "combine")


@dataclass
class EpResult:
    """Raw outcome of an expert-parallel run (the summary is built from it)."""

    step_end_s: np.ndarray
    warmup_steps: int
    measure_start_s: float
    events: int
    tokens_per_step: int
    cp: dict  # critical-path parts (s), measured steps only
    gpu_busy_s: np.ndarray  # [G] attention + expert compute, measured
    gpu_comm_s: float  # time in collectives (same for every GPU), measured
    gpu_tokens: np.ndarray  # [G] expert tokens computed, measured
    pair_bytes: np.ndarray  # [G, G] bytes moved GPU a -> b (dispatch + combine), measured
    link_bytes: np.ndarray  # [n_links], measured
    dispatched_bytes: float
    combined_bytes: float
    remote_sends: int
    per_layer: dict  # name -> [L] arrays
    imbalance_ratios: np.ndarray  # per measured layer-step: max/mean per-GPU expert tokens
    straggler_counts: np.ndarray  # [G] how often a GPU was the slowest in expert compute
    rebalance: dict
    timeline: list | None = None
    stage_s: dict = field(default_factory=dict)
    step_tokens: np.ndarray | None = None  # tokens of each step (changes at an elastic scale-up)


class _Totals:
    """What the measured steps add up (one object for both step shapes)."""

    def __init__(self, G: int, L: int, n_links: int):
        self.cp = dict.fromkeys(("gpu_compute", "copy_wait", "host", "cpu_expert", "comm", "idle"), 0.0)
        self.busy = np.zeros(G)
        self.tokens = np.zeros(G)
        self.comm = 0.0
        self.pair = np.zeros((G, G))
        self.links = np.zeros(n_links)
        self.disp_b = self.comb_b = 0.0
        self.remote = 0
        self.per_layer = {k: np.zeros(L) for k in ("dispatch_s", "combine_s", "experts_s", "attention_s",
                                                   "imbalance", "remote_sends", "rebalance_stall_s")}
        self.ratios: list = []
        self.stragglers = np.zeros(G, dtype=np.int64)
        self.stage = dict.fromkeys(STAGES, 0.0)
        self.reb = {"rebalances": 0, "migrated_experts": 0, "migration_bytes": 0.0, "stall_s": 0.0, "planning_s": 0.0}


class ExpertParallelEngine:
    """Decode over a cluster; see the module docstring."""

    def __init__(self, *, topo, experts, rows_per_step, steps, warmup_steps, col_src, home, groups,
                 placement_policy, placement, alltoall, dense_s, tail_s, expert_t, expert_fixed_s,
                 expert_bytes, context_rows, record_timeline=False, progress=None, planning_s=0.0,
                 micro_batches=1, mb_rows=None, attention_gpus=None, elastic=None, size_tables=None):
        self.topo = topo
        # heterogeneous experts: (seconds by token count per size class [n_cls, n], size class of
        # every (layer, expert) [L, E]) replacing expert_t, or None (one expert size)
        self.size_tables = size_tables
        self.experts = experts  # [T, C, K] trace
        self.R = rows_per_step
        self.steps = steps
        self.warmup_steps = warmup_steps
        self.col_src = list(col_src)
        self.E = int(placement.num_experts)
        self.home = home
        self.groups = groups
        self.placement_policy = placement_policy
        self.placement = placement
        self.a2a = alltoall
        self.dense_s = dense_s  # [L] per-GPU attention + dense time before each MoE layer (per step: + attn core)
        self.tail_s = tail_s
        self.expert_t = expert_t  # [n] seconds for n tokens (without the per-launch fixed time)
        self.expert_fixed_s = expert_fixed_s
        self.expert_bytes = expert_bytes
        self.context_rows = context_rows  # callable step -> [L] attention core seconds
        self.record_timeline = record_timeline
        self.progress = progress
        self.planning_s = planning_s
        self.micro_batches = micro_batches
        self.mb_rows = mb_rows  # row indices of each micro-batch within a step (two-micro-batch overlap)
        self.comm_hidden_s = 0.0  # all-to-all time hidden behind compute (measured steps)
        # elastic scale-up: {"at_step", "home", "groups", "rows_per_step", "mb_rows"} of the larger
        # deployment the run switches to at that step (see scale_up)
        self.elastic = elastic
        self.elastic_report = None
        # attention-FFN disaggregation: GPUs 0..attention_gpus-1 run attention, the rest experts
        self.attention_gpus = attention_gpus
        self.attn_ids = np.arange(attention_gpus if attention_gpus is not None else topo.num_gpus)
        self.G = topo.num_gpus
        self.L = len(self.col_src)
        self.sources = None
        if attention_gpus is not None:  # attention GPU a sends its tokens to EP group a mod groups
            n_groups = len(groups)
            self.sources = [np.arange(attention_gpus)[np.arange(attention_gpus) % n_groups == k] for k in range(n_groups)]
        self.table = dispatch_table(placement, groups, topo.node_of, self.G, self.sources)

    @property
    def home(self) -> np.ndarray:
        """GPU of each row of a step (changes at an elastic scale)."""
        return self._home

    @home.setter
    def home(self, value: np.ndarray) -> None:
        self._home = value
        self._src_e = (value.astype(np.int32) * self.E)[:, None]  # row offsets into a flat [G*E] table

    @property
    def table(self) -> np.ndarray:
        """``[L, G, E]`` serving GPU of (source GPU, expert) per layer (see :func:`dispatch_table`)."""
        return self._table

    @table.setter
    def table(self, value: np.ndarray) -> None:
        self._table = value
        self.table_flat = value.reshape(value.shape[0], -1)

    def _route(self, li: int, ex_all: np.ndarray, idx, has_none: bool):
        """Rows ``idx`` (None = all) of a step at MoE layer ``li``: their GPUs, the GPU serving each
        choice (-1 = none), tokens per (GPU, expert) and each GPU's grouped expert time."""
        G, E = self.G, self.E
        ex = ex_all if idx is None else ex_all[idx]
        src = self.home if idx is None else self.home[idx]
        src_e = self._src_e if idx is None else self._src_e[idx]
        tab = self.table_flat[li]
        if has_none:
            valid = ex >= 0
            dst = np.where(valid, tab[src_e + np.where(valid, ex, 0)], -1)
            cell = np.where(valid, dst * E + ex, G * E)
        else:
            dst = tab[src_e + ex]
            cell = dst * E + ex
        cnt = np.bincount(cell.ravel(), minlength=G * E + 1)[: G * E].reshape(G, E)
        if self.size_tables is None:
            t_exp = self.expert_t[cnt]
        else:  # heterogeneous experts: each expert's time from its size class's table
            tab, cls = self.size_tables
            t_exp = tab[cls[li][None, :], cnt]
        t_gpu = t_exp.sum(axis=1) + np.where(cnt.any(axis=1), self.expert_fixed_s, 0.0)
        return src, dst, cnt, t_gpu

    def _count(self, acc: "_Totals", li: int, t_attn: float, xch, cnt, t_gpu, parts: int = 1) -> None:
        """Measured per-GPU, per-layer and traffic totals of one (layer, micro-batch); the critical
        path is each step shape's own business."""
        tok_g = cnt.sum(axis=1)
        mean = tok_g.mean()
        ratio = float(tok_g.max() / mean) if mean > 0 else 1.0
        t_exp = float(t_gpu.max())
        acc.ratios.append(ratio)
        acc.stragglers[int(t_gpu.argmax())] += 1
        acc.busy += t_gpu
        acc.busy[self.attn_ids] += t_attn
        acc.tokens += tok_g
        acc.comm += xch.dispatch_s + xch.combine_s
        acc.pair += xch.pair_bytes
        acc.links += xch.link_bytes
        acc.remote += xch.remote_sends
        acc.disp_b += xch.remote_sends * self.a2a.dispatch_bytes
        acc.comb_b += xch.remote_sends * self.a2a.combine_bytes
        for key, v in (("attention", t_attn), ("dispatch", xch.dispatch_s), ("experts", t_exp),
                       ("combine", xch.combine_s)):
            acc.stage[key] += v
            acc.per_layer[f"{key}_s"][li] += v
        acc.per_layer["imbalance"][li] += ratio / parts  # mean over the layer's micro-batches
        acc.per_layer["remote_sends"][li] += xch.remote_sends

    # ------------------------------------------------------------------------------------------
    def row_start(self, s: int) -> int:
        """First trace row of step ``s`` (rows are consumed in order; R changes at a scale-up)."""
        el = self.elastic
        if el is None or s <= el["at_step"]:
            return s * (self.R if el is None else el["rows_before"])
        return el["at_step"] * el["rows_before"] + (s - el["at_step"]) * el["rows_per_step"]

    def rows(self, s: int) -> np.ndarray:
        T = self.experts.shape[0]
        return (self.row_start(s) + np.arange(self.R)) % T

    def window_routing(self, s0: int, s1: int) -> np.ndarray:
        """Routing of steps [s0, s1) in model-layer columns, [rows, L, K]."""
        rows = np.concatenate([self.rows(s) for s in range(s0, s1)])
        return self.experts[rows][:, self.col_src, :]

    def run(self) -> EpResult:
        env = simpy.Environment()
        out = {}
        env.process(self.loop(env, out))
        env.run()
        return out["result"]

    def loop(self, env, out):  # noqa: C901 - one loop on purpose
        G, L = self.G, self.L
        topo = self.topo
        n_links = len(topo.link_ids)
        step_end = np.zeros(self.steps)
        step_tokens = np.zeros(self.steps, dtype=np.int64)
        measure_start = 0.0
        acc = _Totals(G, L, n_links)
        cp, reb = acc.cp, acc.reb
        timeline = [] if self.record_timeline else None
        events = 0
        N = getattr(self.placement_policy.config, "rebalance_every_steps", 0)
        has_none = bool((self.experts < 0).any())
        for s in range(self.steps):
            measured = s >= self.warmup_steps
            if s == self.warmup_steps:
                measure_start = env.now
            stall = None
            if self.elastic is not None and s == self.elastic["at_step"]:
                stall = self.scale(s)
                if stall["kv_s"]:
                    t0 = env.now
                    yield env.timeout(stall["kv_s"])
                    events += 1
                    if measured:
                        cp["copy_wait"] += stall["kv_s"]
                    if timeline is not None:
                        timeline.append(("network", "kv_migration", t0, env.now, s, -1, -1,
                                         int(self.elastic_report["kv_moved_bytes"])))
                if self.elastic["planning_s"]:
                    t0 = env.now
                    yield env.timeout(self.elastic["planning_s"])
                    events += 1
                    if measured:
                        cp["host"] += self.elastic["planning_s"]
                    if timeline is not None:
                        timeline.append(("host0", "scale_up_plan", t0, env.now, s, -1, -1, 0))
            elif N and s > 0 and s % N == 0:
                stall = self.rebalance(s, N)
                reb["rebalances"] += 1 if measured else 0
                if measured:
                    reb["migrated_experts"] += stall["moved"]
                    reb["migration_bytes"] += stall["bytes"]
                if self.planning_s:
                    t0 = env.now
                    yield env.timeout(self.planning_s)
                    events += 1
                    if measured:
                        cp["host"] += self.planning_s
                        reb["planning_s"] += self.planning_s
                    if timeline is not None:
                        timeline.append(("host0", "rebalance_plan", t0, env.now, s, -1, -1, 0))
            ex_step = self.experts[self.rows(s)]
            step_tokens[s] = self.R
            attn_core = self.context_rows(s)
            prev_dst = None
            if self.micro_batches > 1 or self.attention_gpus is not None:
                events += yield from self._overlapped_step(env, s, ex_step, attn_core, stall, measured, acc, timeline,
                                                           has_none)
                step_end[s] = env.now
                if self.progress is not None:
                    self.progress(s + 1, self.steps)
                continue
            for li in range(L):
                src, dst, cnt, t_gpu = self._route(li, ex_step[:, self.col_src[li], :].astype(np.int32), None, has_none)
                # --- attention + dense parts (equal on every GPU: same tokens per GPU)
                t_attn = self.dense_s[li] + attn_core
                t0 = env.now
                yield env.timeout(t_attn)
                if timeline is not None:
                    timeline.append(("gpus", "attention", t0, env.now, s, li, -1, 0))
                # --- rebalancing stall: this layer's new experts arrive before it runs them
                if stall is not None and stall["layer_s"][li] > 0:
                    t0 = env.now
                    yield env.timeout(stall["layer_s"][li])
                    events += 1
                    if measured:
                        cp["copy_wait"] += stall["layer_s"][li]
                        reb["stall_s"] += stall["layer_s"][li]
                        acc.per_layer["rebalance_stall_s"][li] += stall["layer_s"][li]
                    if timeline is not None:
                        timeline.append(("network", "rebalance", t0, env.now, s, li, -1, int(stall["layer_bytes"][li])))
                # --- dispatch
                xch = self.a2a.exchange(src, dst, layer=li, prev_dst=prev_dst)
                t0 = env.now
                yield env.timeout(xch.dispatch_s)
                if timeline is not None:
                    timeline.append(("network", "dispatch", t0, env.now, s, li, -1, int(xch.pair_bytes.sum())))
                # --- expert compute per GPU
                t_exp = float(t_gpu.max())
                t0 = env.now
                yield env.timeout(t_exp)
                if timeline is not None:
                    timeline.append(("gpus", "experts", t0, env.now, s, li, int(t_gpu.argmax()), 0))
                # --- combine
                t0 = env.now
                yield env.timeout(xch.combine_s)
                if timeline is not None:
                    timeline.append(("network", "combine", t0, env.now, s, li, -1, 0))
                events += 4
                prev_dst = dst
                if measured:
                    self._count(acc, li, t_attn, xch, cnt, t_gpu)
                    cp["gpu_compute"] += t_attn + t_exp
                    cp["comm"] += xch.dispatch_s + xch.combine_s
            t0 = env.now
            yield env.timeout(self.tail_s)
            events += 1
            if measured:
                cp["gpu_compute"] += self.tail_s
                acc.busy += self.tail_s
            if timeline is not None:
                timeline.append(("gpus", "tail", t0, env.now, s, -1, -1, 0))
            step_end[s] = env.now
            if self.progress is not None:
                self.progress(s + 1, self.steps)
        out["result"] = EpResult(
            step_end_s=step_end,
            warmup_steps=self.warmup_steps,
            measure_start_s=measure_start,
            events=events + self.steps,
            tokens_per_step=self.R,
            step_tokens=step_tokens,
            cp=cp,
            gpu_busy_s=acc.busy,
            gpu_comm_s=acc.comm,
            gpu_tokens=acc.tokens,
            pair_bytes=acc.pair,
            link_bytes=acc.links,
            dispatched_bytes=acc.disp_b,
            combined_bytes=acc.comb_b,
            remote_sends=acc.remote,
            per_layer=acc.per_layer,
            imbalance_ratios=np.asarray(acc.ratios),
            straggler_counts=acc.stragglers,
            rebalance=reb,
            timeline=timeline,
            stage_s=acc.stage,
        )

    # ------------------------------------------------------------------------------------------
    def _overlapped_step(self, env, s, ex_step, attn_core, stall, measured, acc, timeline, has_none):  # noqa: C901
        """One decode step with two micro-batches (DeepSeek-V3's decode overlap): the compute
        stream runs attention(A), attention(B), experts(A), experts(B) per layer while the
        communication stream runs dispatch(A), dispatch(B), combine(A), combine(B), each op
        starting when its stream is free and its input is ready, so one micro-batch's all-to-all
        hides behind the other's compute. Each micro-batch reads the dense and expert weights
        again (the price of the overlap). A rebalancing stall holds both streams. Events: one per
        (layer, micro-batch), at its combine."""
        L = self.L
        t_start = env.now
        disagg = self.attention_gpus is not None
        # streams: attention compute "a", expert compute (the same stream when co-located),
        # dispatch "d" and combine (the same stream when co-located; the two directions of the
        # M-to-N transfer when attention and experts live on different GPUs)
        ek, ck = ("e", "c") if disagg else ("a", "d")
        res_a, res_e = ("attention_gpus", "expert_gpus") if disagg else ("gpus", "gpus")
        net_d, net_c = ("network.a2e", "network.e2a") if disagg else ("network", "network")
        free = dict.fromkeys(("a", "e", "d", "c"), t_start)
        comb_end = [t_start] * self.micro_batches
        iv = {r: [] for r in (res_a, res_e, net_d, net_c)}
        stall_s = 0.0
        events = 0
        prev = [None] * self.micro_batches
        for li in range(L):
            ex_all = ex_step[:, self.col_src[li], :].astype(np.int32)
            work = []
            for m, idx in enumerate(self.mb_rows):
                src, dst, cnt, t_gpu = self._route(li, ex_all, idx, has_none)
                xch = self.a2a.exchange(src, dst, layer=li, prev_dst=prev[m])
                prev[m] = dst
                work.append((self.dense_s[li] + attn_core, xch, cnt, t_gpu))
            ops = []
            d_end = []
            for m, (t_attn, xch, _, _) in enumerate(work):
                a0 = max(free["a"], comb_end[m])
                free["a"] = a0 + t_attn
                ops.append((res_a, f"attention.mb{m}", a0, free["a"]))
                d0 = max(free["d"], free["a"])
                free["d"] = d0 + xch.dispatch_s
                d_end.append(free["d"])
                ops.append((net_d, f"dispatch.mb{m}", d0, free["d"]))
            if stall is not None and stall["layer_s"][li] > 0:
                st0 = max(free[ek], free["d"], free[ck])
                free[ek] = free["d"] = free[ck] = st0 + stall["layer_s"][li]
                stall_s += stall["layer_s"][li]
                ops.append((net_d, "rebalance", st0, free["d"]))
                if measured:
                    acc.reb["stall_s"] += stall["layer_s"][li]
                    acc.per_layer["rebalance_stall_s"][li] += stall["layer_s"][li]
            for m, (_, xch, _, t_gpu) in enumerate(work):
                e0 = max(free[ek], d_end[m])
                free[ek] = e0 + float(t_gpu.max())
                ops.append((res_e, f"experts.mb{m}", e0, free[ek]))
                c0 = max(free[ck], free[ek])
                free[ck] = c0 + xch.combine_s
                comb_end[m] = free[ck]
                ops.append((net_c, f"combine.mb{m}", c0, free[ck]))
            for res_id, kind, a, b in ops:
                if b > a and kind != "rebalance":
                    iv[res_id].append((a, b))
                if timeline is not None:
                    timeline.append((res_id, kind, a, b, s, li, -1, 0))
            for m in range(self.micro_batches):
                yield env.timeout(comb_end[m] - env.now)
                events += 1
            if measured:
                for t_attn, xch, cnt, t_gpu in work:
                    self._count(acc, li, t_attn, xch, cnt, t_gpu, parts=self.micro_batches)
        # the tail (dense blocks after the last MoE layer, LM head) after every stream is done
        t0 = max(free.values())
        t1 = t0 + self.tail_s
        iv[res_a].append((t0, t1))
        yield env.timeout(t1 - env.now)
        events += 1
        if timeline is not None:
            timeline.append(("gpus", "tail", t0, t1, s, -1, -1, 0))
        if measured:
            acc.busy[self.attn_ids] += self.tail_s
            total = t1 - t_start
            comp_iv = _union(iv[res_a], iv[res_e])
            comm_iv = _union(iv[net_d], iv[net_c])
            comp = sum(b - a for a, b in comp_iv)
            comm = sum(b - a for a, b in comm_iv)
            hidden = _overlap(comp_iv, comm_iv)
            cp = acc.cp
            cp["gpu_compute"] += comp
            cp["comm"] += comm - hidden
            cp["copy_wait"] += stall_s
            cp["idle"] += max(0.0, total - comp - (comm - hidden) - stall_s)
            self.comm_hidden_s += hidden
        return events

    def _stable(self, old, new, ctx):
        """``new`` relabelled to keep experts in place (when the policy asks for it): each layer on
        its own for policies with per-layer costs, one renaming for all layers for those with
        inter-layer costs (MoETuner, ExFlow-style co-activation), which it keeps intact."""
        cfg = self.placement_policy.config
        if not getattr(cfg, "stable_relabel", False):
            return new
        from moesim.policies.placement.rebalance import relabel_for_stability

        inter = cfg.kind == "moetuner" or getattr(cfg, "affinity", "intra_layer") != "intra_layer"
        out = relabel_for_stability(old, new, ctx.gpus_per_node, per_layer=not inter)
        out.info = new.info
        out.validate()
        return out

    def scale(self, s: int) -> dict:
        """Switch to the other deployment at step ``s`` (ElasticMoE-style scaling while serving).

        Scale-up: the sequences already running keep their GPUs and KV caches, the new GPUs take
        new ones. Scale-down: every sequence keeps running; those of the leaving GPUs move, with
        their KV caches (context x ``kv_bytes_per_token``), to the remaining GPUs (round robin),
        before the step's first layer. Either way a new placement over the remaining EP GPUs is
        computed from the steps run so far, and every layer stalls before its experts run until the
        experts its GPUs gain are copied from GPUs that hold them (leaving GPUs included: they serve
        the copies before they go). Returns the stall in :meth:`rebalance`'s form plus ``kv_s``."""
        from moesim.policies.placement.base import Placement
        from moesim.policies.placement.rebalance import migration

        el = self.elastic
        old = self.placement
        gg_old = np.asarray(self.groups[0])
        home_old = self.home
        self.home, self.groups, self.R = el["home"], el["groups"], el["rows_per_step"]
        self.mb_rows = el["mb_rows"]
        if "dense_s" in el:  # more sequences per GPU after a scale-down
            self.dense_s, self.tail_s, self.context_rows = el["dense_s"], el["tail_s"], el["context_rows"]
        gg_new = np.asarray(self.groups[0])
        ctx = placement_context(self.groups, self.topo.node_of, self.E, self.expert_bytes,
                                self.window_routing(0, s) if s > 0 else self.experts[: self.R][:, self.col_src, :])
        new = self.placement_policy.place(ctx)
        new.validate()
        # both placements in the numbering of the larger group (a GPU keeps its id)
        big, small = (gg_new, gg_old) if len(gg_new) >= len(gg_old) else (gg_old, gg_new)
        pos = {int(g): i for i, g in enumerate(big)}

        def renumber(pl, gg):
            return Placement(slot_expert=pl.slot_expert, slot_gpu=np.vectorize(lambda i: pos[int(gg[i])])(pl.slot_gpu),
                             num_experts=pl.num_experts, num_gpus=len(big))

        old_b, new_b = renumber(old, gg_old), renumber(new, gg_new)
        if len(gg_new) >= len(gg_old):
            new = self._stable(old_b, new_b, ctx)
            new_b = new
        mig = migration(old_b, new_b, gpus_per_node=ctx.gpus_per_node)
        G = self.G
        layer_s, layer_bytes = self._copy_stalls(mig, [big])
        # KV caches of the sequences whose GPU leaves
        kv = np.zeros((G, G))
        n_moved = 0
        if len(gg_new) < len(gg_old):
            moved = home_old[: self.R] != self.home
            n_moved = int(moved.sum())
            np.add.at(kv, (home_old[: self.R][moved], self.home[moved]), el["kv_bytes_per_seq"](s))
        kv_s = self.topo.collective_time(kv)[0] if kv.any() else 0.0
        self.placement = new
        self.table = dispatch_table(new, self.groups, self.topo.node_of, G, self.sources)
        self.elastic_report = {
            "at_step": s,
            "direction": "up" if len(gg_new) > len(gg_old) else "down",
            "gpus_before": int(len(gg_old)),
            "gpus_after": int(len(gg_new)),
            "moved_experts": int(mig.sum()),
            "migration_bytes": float(layer_bytes.sum()),
            "stall_ms": float(layer_s.sum() * 1e3),
            "kv_moved_sequences": n_moved,
            "kv_moved_bytes": float(kv.sum()),
            "kv_stall_ms": float(kv_s * 1e3),
            "planning_ms": float(el["planning_s"] * 1e3),
            "sequences_before": int(el["rows_before"]),
            "sequences_after": int(self.R),
        }
        return {"layer_s": layer_s, "layer_bytes": layer_bytes, "moved": int(mig.sum()),
                "bytes": float(layer_bytes.sum()), "kv_s": kv_s}

    def _copy_stalls(self, mig: np.ndarray, groups) -> tuple[np.ndarray, np.ndarray]:
        """Per layer, the time and bytes of copying experts: ``mig[l, a, b]`` copies from local GPU
        a to local GPU b of every EP group in ``groups``, all at once over the links."""
        G = self.G
        layer_s = np.zeros(self.L)
        layer_bytes = np.zeros(self.L)
        for li in range(self.L):
            m = np.zeros((G, G))
            for gg in groups:
                m[np.ix_(gg, gg)] += mig[li] * self.expert_bytes
            if m.any():
                layer_s[li], _ = self.topo.collective_time(m)
                layer_bytes[li] = m.sum()
        return layer_s, layer_bytes

    def rebalance(self, s: int, window: int) -> dict:
        """New placement from the last ``window`` steps; the copies it needs and their time."""
        from moesim.policies.placement.rebalance import migration

        old = self.placement
        ctx = placement_context(self.groups, self.topo.node_of, self.E, self.expert_bytes,
                                self.window_routing(max(0, s - window), s))
        new = self.placement_policy.place(ctx)
        new.validate()
        new = self._stable(old, new, ctx)
        mig = migration(old, new, gpus_per_node=ctx.gpus_per_node)  # [L, ep, ep] expert copies a -> b
        G = self.G
        layer_s, layer_bytes = self._copy_stalls(mig, self.groups)
        self.placement = new
        self.table = dispatch_table(new, self.groups, self.topo.node_of, G, self.sources)
        return {
            "layer_s": layer_s,
            "layer_bytes": layer_bytes,
            "moved": int(mig.sum()) * len(self.groups),
            "bytes": float(layer_bytes.sum()),
        }


def _union(a: list, b: list) -> list:
    """Union of two lists of intervals, as sorted disjoint intervals."""
    out = []
    for lo, hi in sorted(a + b):
        if out and lo <= out[-1][1]:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _overlap(a: list, b: list) -> float:
    """Total length of the intersection of two lists of disjoint, sorted intervals."""
    i = j = 0
    tot = 0.0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][1], b[j][1])
        if hi > lo:
            tot += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tot


def placement_context(groups: np.ndarray, node_of, num_experts: int, expert_bytes: float, routing: np.ndarray):
    """The :class:`PlacementContext` of one EP group (all groups hold the same placement) for
    ``routing`` ([rows, L, K]); its GPUs per node = the group's members on its first node."""
    from moesim.policies.placement.base import PlacementContext

    gg = groups[0]
    node = np.asarray(node_of)[gg]
    return PlacementContext(
        num_gpus=len(gg),
        gpus_per_node=int((node == node[0]).sum()),
        num_experts=num_experts,
        routing=routing,
        expert_bytes=float(expert_bytes),
    )


def dispatch_table(placement, groups: np.ndarray, node_of, num_gpus: int, sources=None) -> np.ndarray:
    """``[L, G, E]`` global GPU that serves a token on GPU g routed to expert e.

    Each EP group holds the placement on its own GPUs (local index i = ``groups[k][i]``) and serves
    the tokens of its members, plus ``sources[k]`` (other GPUs whose tokens it serves: the
    attention GPUs of a disaggregated deployment). Replica choice, deterministic: a replica on the
    token's GPU, else one of those on its node (the ``g mod n``-th), else the ``g mod replicas``-th
    of all replicas (spreads senders evenly). Vectorised over (GPU, expert) per layer."""
    L, E = placement.num_layers, placement.num_experts
    node_of = np.asarray(node_of)
    out = np.full((L, num_gpus, E), -1, dtype=np.int32)
    for k, gg in enumerate(groups):
        gg = np.asarray(gg)
        extra = np.asarray(sources[k] if sources is not None else [], dtype=np.int64)
        srcs = np.concatenate([gg, extra])
        n = len(srcs)
        member = np.full(n, -1)
        member[: len(gg)] = np.arange(len(gg))  # local index of a source that holds slots
        gnode = node_of[gg]
        nodes_u = np.unique(gnode)
        lnode = np.searchsorted(nodes_u, gnode)  # node rank of each member
        nn = len(nodes_u)
        sn_src = np.searchsorted(nodes_u, node_of[srcs])
        in_group_node = (sn_src < nn) & (nodes_u[np.minimum(sn_src, nn - 1)] == node_of[srcs])
        sn_src = np.where(in_group_node, sn_src, 0)
        gsrc = srcs[:, None]  # the modulus uses global ids, as a source GPU sees them
        for l in range(L):
            se = placement.slot_expert[l].astype(np.int64)
            sg = placement.slot_gpu[l].astype(np.int64)
            nrep = np.bincount(se, minlength=E)
            if (nrep == 1).all():
                gpu_of = np.empty(E, dtype=np.int64)
                gpu_of[se] = sg
                out[l, srcs, :] = gg[gpu_of][None, :]
                continue
            # all replicas of each expert, in (expert, gpu) order
            o = np.lexsort((sg, se))
            sg_e = sg[o]
            start = np.concatenate([[0], np.cumsum(nrep)[:-1]])
            pick = sg_e[start[None, :] + (gsrc % nrep[None, :])]  # [n, E] local GPU
            # replicas on the source's node, in (expert, node, gpu) order
            sn = lnode[sg]
            o2 = np.lexsort((sg, sn, se))
            sg_en = sg[o2]
            cnt = np.bincount(se * nn + sn, minlength=E * nn).reshape(E, nn)
            start2 = np.concatenate([[0], np.cumsum(cnt.ravel())[:-1]]).reshape(E, nn)
            c_here = np.where(in_group_node[:, None], cnt[:, sn_src].T, 0)  # [n, E]
            s_here = start2[:, sn_src].T
            has = c_here > 0
            local = sg_en[np.where(has, s_here + gsrc % np.maximum(c_here, 1), 0)]
            pick = np.where(has, local, pick)
            # a replica on the source GPU itself
            own = np.zeros((n, E), dtype=bool)
            own[sg, se] = True  # rows 0..len(gg)-1 are the members, in local order
            own[len(gg):] = False
            pick = np.where(own, member[:, None], pick)
            out[l, srcs, :] = gg[pick]
    return out


def ep_groups(num_gpus: int, ep: int, layout: str) -> np.ndarray:
    """``[groups, ep]`` GPU ids of each expert-parallel group: ``folded`` = ep consecutive GPUs
    (inside the NVLink domain when ep <= GPUs per node); ``strided`` = every (G/ep)-th GPU (EP
    drawn from the data-parallel dimension orthogonal to tensor parallelism)."""
    n = num_gpus // ep
    g = np.arange(num_gpus)
    if layout == "folded":
        return g.reshape(n, ep)
    return g.reshape(ep, n).T.copy()


def home_gpus(num_gpus: int, attention_tp: int, batch: int) -> np.ndarray:
    """GPU of each row of a step: DP rank d (``attention_tp`` consecutive GPUs) holds ``batch``
    sequences; its tokens are split over its GPUs for the MoE part (token j on GPU j mod tp)."""
    n_dp = num_gpus // attention_tp
    d = np.repeat(np.arange(n_dp), batch)
    j = np.tile(np.arange(batch), n_dp)
    return (d * attention_tp + j % attention_tp).astype(np.int64)


def ring_allreduce_s(nbytes: float, n: int, bandwidth_b_s: float, latency_s: float) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` GPUs: 2(n-1)/n of the data per GPU, 2(n-1) steps."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / bandwidth_b_s + 2 * (n - 1) * latency_s


def check_fits(scenario, *, slots_per_gpu: int, steps: int, source: str, expert_bytes_per_gpu=None) -> dict:
    """Per-GPU memory: dense weights (split over attention TP) + expert slots + KV cache (with
    attention-FFN disaggregation the larger of an attention GPU's dense + KV and an expert GPU's
    experts); an InputError naming the numbers when it does not fit. ``expert_bytes_per_gpu``:
    the expert bytes of the fullest GPU when experts differ in size (else slots x expert bytes)."""
    m, hw, wl, par = scenario.model, scenario.hardware, scenario.workload, scenario.parallel
    g = hw.gpu
    t = par.attention_tp
    usable = (g.hbm_gib - g.reserved_gib) * GIB
    dense = m.dense_bytes / t
    experts = slots_per_gpu * len(m.moe_layers) * m.expert_bytes
    if expert_bytes_per_gpu is not None:
        experts = expert_bytes_per_gpu
    # the rank's KV cache, split over the TP GPUs that divide its KV heads (MLA: replicated)
    kv = wl.batch_size * t * (wl.context_tokens + steps) * m.kv_bytes_per_token / m.kv_tp_shards(t)
    need = dense + experts + kv
    if par.attention_gpus is not None:
        need = max(dense + kv, experts)
    mem = {
        "gpu_usable_bytes": int(usable),
        "dense_bytes": int(dense),
        "expert_bytes": int(experts),
        "expert_slots_per_layer": int(slots_per_gpu),
        "kv_bytes": int(kv),
        "gpu_used_bytes": int(need),
    }
    if need > usable:
        raise InputError(
            f"does not fit in GPU memory: dense weights {dense / GIB:.2f} GiB + experts "
            f"{experts / GIB:.2f} GiB ({slots_per_gpu} per layer) + KV cache {kv / GIB:.2f} GiB = "
            f"{need / GIB:.2f} GiB > {usable / GIB:.2f} GiB usable per GPU",
            source=source,
            field="parallel.ep",
        )
    return mem


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


