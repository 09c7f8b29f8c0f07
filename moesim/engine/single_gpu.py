"""Batched decode on one GPU with experts offloaded to host memory.

Actors and timelines (DESIGN 4.1): the host is a SimPy process (``host_loop``) that spends host
time launching kernels, issuing copies and reading router outputs back; it waits (a SimPy event)
only where it must: for each layer's router output, and for the sampled token at the end of each
step. The GPU compute stream and the host-to-device copy engine are in-order timelines: an op
starts at max(stream free, the host's issue time, the events it waits on) — bookkeeping on floats,
recorded as timeline rows, no SimPy event.

Per MoE layer of a step:

1. *dense stage*: the non-MoE blocks since the previous MoE layer and this block's attention, router
   and shared experts, launched kernel by kernel (eager), one CUDA graph per block (graph/fused);
2. *router read-back*: the host waits for the router output and pays the read-back cost;
3. *cache decision*: hits are touched, misses loaded (victims from the cache policy; a load waits
   for the slot's previous user to finish), overflow streamed through transient buffers;
4. *copies* are issued first (FIFO on the copy engine; setup + bytes at the link's rate; a pageable
   copy blocks the host), then *expert kernels*: resident ones first, then each loaded expert after
   its copy. Tokens of the batch that share an expert share one load and one kernel whose time
   depends on their count. Memory-bound kernels are slowed by the calibrated factor while a copy
   runs (compute-bound ones by theirs).

A precision policy (:class:`~moesim.policies.precision.base.PrecisionRun`) picks a level per miss
(its bytes, copy time and kernel time) and may top up resident copies (a copy of the missing bytes;
the cache entry grows); with memory tiers (:mod:`moesim.hardware.tiers`) each expert's home tier
sets its copy's rate (pinned, or pageable and host-blocking) and whether a flash read comes first.

A sequence of ``n`` equal kernels launched at ``λ`` host seconds each from host time ``h0`` with
total GPU time ``G`` ends at ``max(start + G, h0 + nλ + G/n)`` (the first kernel cannot start before
``h0 + λ``, and the last not before ``h0 + nλ``): launch-bound small kernels fall out of this
closed form without one event per kernel. λ is the host's per-op cost of an eager framework call
(``hardware.host.eager_op_us``: Python, dispatcher, allocation and launch) where the hardware
gives one, else the bare kernel enqueue ``launch_us``.

Steps come from one of two sources. A fixed-batch run replays a precomputed
:class:`~moesim.engine.plan.DecodePlan` (``batch_size`` consecutive trace rows per step) with stage
times computed before the run. A serving run (``workload.requests``) has no such plan: the batch of
step ``s`` depends on when step ``s - 1`` ended and on who arrived by then, so at each step boundary
the host asks a :class:`~moesim.serving.scheduler.Scheduler` for the next step. The scheduler (fed
by the ``arrivals`` process, one event per request) lets the batching policy pick prefill chunks and
decode tokens, allocates their KV, writes the step's trace rows into a
:class:`~moesim.engine.plan.ServingPlan` (so ``plan.row(s, col)`` works as before) and hands back
the stage times of that token mix, computed lazily per token count and cached. With nothing to run
the host waits for the next arrival (the wait is the step's ``idle`` part). The per-layer code is
the same for both sources, so the fixed-batch path keeps its events (one per (step, MoE layer) and
one per step) and its speed; a serving run adds one event per arrival and per idle wait.

With a whole-layer offload (llama.cpp ``-ngl``, ``StageTimes.offload``) the leading blocks of a
stage, or of the tail, and possibly the output layer run on the CPU, computed by the host thread
while the GPU waits; the hidden state is copied over the link (``act_h2d`` / ``act_d2h``, the full
batch) wherever a CPU segment meets a GPU one; a CPU block's router output is on the host already
and its experts (all CPU experts) need no activation copies. The gap a GPU op waits for such work is
``cpu_expert`` time.

Critical path (DESIGN 3.4): every second of a step lies on the compute stream's timeline, either in
an op (GPU compute, plus any launch-bound stretch = host) or in a gap before an op, attributed to
what the op waited for (its copy = copy_wait; its launch = host); the time from the last op to the
step's end is the host reading the token back. The parts sum to the step time exactly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import simpy

CP_KEYS = ("gpu_compute", "copy_wait", "host", "cpu_expert", "comm", "idle")

# timeline row: (resource, kind, start_s, end_s, step, layer, expert, bytes)
TIMELINE_COLUMNS = ("resource", "kind", "start_s", "end_s", "step", "layer", "expert", "bytes")


@dataclass
class StageTimes:
    """Precomputed GPU times of the stages of one step (seconds)."""

    dense_base: list  # per MoE column: non-attention-core time of its dense stage
    dense_blocks: list  # per MoE column: blocks in the stage (attention cores to add)
    dense_membound: list
    attn: list  # per step: attention-core time of one block
    tail_base: float  # trailing dense blocks + LM head
    tail_blocks: int
    tail_membound: bool
    expert: list  # index = token count
    expert_membound: list
    expert_fixed: float = 0.0  # fixed kernel time inside one expert op (a fused group pays it once)
    cpu_expert: list = field(default_factory=list)  # CPU time of one expert, index = token count
    act_d2h: list = field(default_factory=list)  # activation copy to the host, index = tokens
    act_h2d: list = field(default_factory=list)  # results back to the GPU, index = tokens
    dense_bytes: list = field(default_factory=list)  # per MoE column: dense weights of its stage
    dense_copy: list = field(default_factory=list)  # per MoE column: their copy time (streamed)
    # whole blocks on the CPU (llama.cpp -ngl): a moesim.policies.execution.llamacpp.LayerOffloadTimes
    # with the CPU side, the fields above then hold the GPU blocks only; None = every block on the GPU
    offload: object = None


@dataclass
class EngineResult:
    """Raw outputs of one engine run; :mod:`moesim.metrics` turns them into the summary."""

    steps: int
    warmup_steps: int
    batch_size: int
    step_end_s: np.ndarray  # end time of each step
    step_parts_s: np.ndarray  # [steps, len(CP_KEYS)] critical-path seconds per step
    busy_s: dict  # resource -> busy seconds during measured steps
    counters: dict  # cache / transfer counters over measured steps
    per_column: dict  # name -> np.ndarray per MoE column (measured steps)
    events: int
    timeline: list = field(default_factory=list)
    measure_start_s: float = 0.0


class SingleGpuEngine:
    """Replays a :class:`~moesim.engine.plan.DecodePlan` on one GPU under a cache policy."""

    def __init__(
        self,
        *,
        plan,
        col_src: list,
        model_layers: list,
        cache,
        stage: StageTimes,
        hw,
        runtime,
        expert_bytes: int,
        copy_s: float,
        warmup_steps: int,
        act_bytes_per_token: int = 0,
        storage=None,
        record_timeline: bool = True,
        progress=None,
        prefetcher=None,
        execution=None,
        precision=None,
        serving=None,
        sizes=None,
        tiers=None,
        copy_time=None,
    ):
        # heterogeneous experts (moesim.models.expert_sizes): (bytes, copy seconds, kernel-time
        # table, memory-bound table) per cache key, or None when every expert has expert_bytes
        self.sizes = sizes
        self.plan = plan
        self.col_src = col_src
        self.model_layers = model_layers
        self.cache = cache
        self.stage = stage
        self.hw = hw
        self.runtime = runtime
        self.expert_bytes = expert_bytes
        self.copy_s = copy_s
        self.warmup_steps = warmup_steps
        self.act_bytes_per_token = act_bytes_per_token
        self.storage = storage  # a StorageSpec when the experts' home copy is on flash
        self.record = record_timeline
        self.progress = progress
        self.prefetcher = prefetcher
        self.execution = execution
        self.precision = precision  # None, or a moesim.policies.precision.base.PrecisionRun
        # memory tiers (moesim.hardware.tiers): home tier of each cache key (0 pinned, 1 pageable,
        # 2 storage), or None when every home copy is alike; copy_time(nbytes, pinned) -> seconds
        self.tiers = tiers
        self.copy_time = copy_time
        self.serving = serving  # a moesim.serving.scheduler.Scheduler, or None (fixed batches)
        self.gpu_id = "gpu0"
        self.link_id = "link." + hw.link.name
        self.noise = None  # per-op timing multipliers of a replica (moesim.perf.uncertainty), else None
        # moesim.perf.cpu.CpuExpertModel: CPU experts on thread workers (NUMA, units, concurrency);
        # None = the aggregate model (one expert at a time over all cores)
        self.cpu_model = None

    def run(self) -> EngineResult:
        """Run the simulation to the end of the plan."""
        env = simpy.Environment()
        self._events = 0
        env.process(self.host_loop(env))
        if self.serving is not None:
            env.process(self.arrivals(env))
        env.run()
        if self.serving is not None:
            self._result.events += self._events
        return self._result

    def arrivals(self, env):
        """Requests arriving (serving runs): one event per arrival; an arrival wakes the host when
        it waits with nothing to run. The scheduler admits requests by their arrival times, so
        which of two simultaneous events SimPy runs first does not change the result."""
        sv = self.serving
        for t in sv.arrival_times:
            if t > env.now:
                yield env.timeout(t - env.now)
                self._events += 1
                sv.stats.arrival_events += 1
            sv.on_arrival(env.now)
            w = sv.waiter
            if w is not None and not w.triggered:
                sv.waiter = None
                w.succeed()

    # The hot loop: locals, not attributes, for speed.
    def host_loop(self, env):  # noqa: C901 - one tight loop on purpose
        """The host thread: issues every stage of every step and waits where a runtime must."""
        plan, cache, st, rt, hw = self.plan, self.cache, self.stage, self.runtime, self.hw
        C = len(self.col_src)
        serving = self.serving
        S = plan.steps if serving is None else 1 << 62  # a serving run ends when its requests do
        col_src = self.col_src
        mlayers = self.model_layers
        E = cache.E
        rec = self.record
        tl = [] if rec else None
        gpu_c, gpu_h2d, host_r, link_r = "gpu0.compute", "gpu0.h2d", "host0", self.link_id
        eager = rt.launch_mode == "eager"
        fused = rt.launch_mode == "fused"
        lam = hw.host.op_launch_us * 1e-6  # per kernel launched one by one (eager_op_us, else launch_us)
        lam_g = hw.host.graph_launch_us * 1e-6
        iota = hw.host.copy_issue_us * 1e-6
        rho = hw.host.router_readback_us * 1e-6
        pageable = rt.host_memory == "pageable"
        wait_router = rt.wait_for_router
        f_mem = hw.gpu.copy_interference.memory_bound_slowdown
        f_cmp = hw.gpu.copy_interference.compute_bound_slowdown
        # CPU experts read DRAM, which the copy engine's DMA reads pinned memory from at the link
        # rate: while a host-to-device copy runs the CPU keeps only what is left of the bandwidth
        dram, pcie = hw.cpu.dram_bandwidth_gb_s, hw.link.h2d_bandwidth_gb_s
        f_dram = dram / max(dram - pcie, 0.1 * dram) if hw.link.kind == "pcie" else 1.0
        dk = rt.dense_kernels_per_layer
        ek = rt.kernels_per_expert
        texp, tmb = st.expert, st.expert_membound
        copy_s = self.copy_s
        xfix = st.expert_fixed
        xb = self.expert_bytes
        kbytes = kcopy = ktab = kmb = None  # per-key bytes / copy time / kernel tables (sized experts)
        if self.sizes is not None:
            kbytes, kcopy, ktab, kmb = self.sizes
        nbuf = max(1, cache.transient_buffer_count())
        tbuf = [0.0] * nbuf
        group_launch = fused or not wait_router
        lam_grp = lam if fused else lam_g  # one fused kernel, or one graph, per group
        n_exp, lam_exp = (ek, lam) if eager else (1, lam_g)
        last_end: dict = {}
        copies = deque()  # (start, end) of copies that may still overlap future GPU kernels
        copies_cpu = deque()  # the same, for CPU experts (their DRAM bandwidth is shared)
        warm = self.warmup_steps

        # measured counters
        n_acc = n_hit = n_miss = n_evict = n_copies = n_stream = 0
        bytes_h2d = 0
        n_dense = bytes_dense = 0
        busy_gpu = busy_cp = busy_host = 0.0
        col_hits = [0] * C
        col_miss = [0] * C
        col_loads = [0] * C
        col_stream = [0] * C
        col_evict = [0] * C
        col_tokens = [0] * C
        col_distinct = [0] * C
        step_end = []
        parts = []
        events = 0

        def stretch(start, dur, factor, copies=copies):
            # an op starting at `start` with nominal `dur` runs at 1/factor speed while a host-to-
            # device copy runs. Ops of one in-order resource start in order, so each resource keeps
            # its own queue of copies and drops those that ended before its current op.
            if factor == 1.0 or not copies:
                return dur
            while copies and copies[0][1] <= start:
                copies.popleft()
            t = start
            left = dur
            for cs, ce in copies:
                if left <= 0.0:
                    break
                if ce <= t:
                    continue
                if cs > t:
                    free = cs - t
                    if free >= left:
                        return t + left - start
                    left -= free
                    t = cs
                # inside [t, ce): progress at 1/factor
                span = ce - t
                work = span / factor
                if work >= left:
                    return t + left * factor - start
                left -= work
                t = ce
            return t + left - start

        host = 0.0
        gpu = 0.0
        cp = 0.0
        ready: dict = {}  # key -> time its copy lands (demand, streamed or prefetched)
        sto = self.storage
        on_ssd = sto is not None
        ssd_r = "ssd0" if sto is None else sto.name
        ssd_lat = 0.0 if sto is None else sto.latency_us * 1e-6
        ssd_inv = 0.0 if sto is None else 1.0 / (sto.read_gb_s * 1e9)
        gds = on_ssd and sto.gpudirect
        ssd_free = busy_ssd = 0.0
        bytes_ssd = 0
        stream_dense = rt.dense_weights == "streamed"
        dense_ready = [-1.0] * C  # when each stage's streamed dense weights land (-1: not issued)
        dense_buf = [0.0, 0.0]  # double buffer for streamed dense weights: free from
        if self.precision is not None:
            from moesim.policies.precision.base import grow as grow_entry
        lvl_now: dict = {}  # experts of the current layer held or loaded below level 0 -> level
        key_lvl: dict = {}  # resident key -> precision level of its copy (absent = level 0)
        key_bytes = cache.key_bytes
        prec = pr = None
        n_lv = 1
        if self.precision is not None:
            pr = self.precision
            prec, mean_weight, pr_b, pr_copy, pr_t = pr.policy, pr.mean_weight, pr.nbytes, pr.copy_s, pr.texp
            n_lv = len(pr_b)
        lv_loads, lv_bytes, lv_time, lv_mass = [0] * n_lv, [0] * n_lv, [0.0] * n_lv, [0.0] * n_lv
        n_topup = bytes_topup = 0
        q_total = q_low = q_skip = 0.0  # gate mass: all, served at low precision, skipped
        n_skip = n_low_loads = 0
        tier_of = self.tiers
        ct_memo: dict = {}  # (bytes, pinned) -> copy seconds
        ti_loads, ti_bytes = [0, 0, 0], [0, 0, 0]
        ex_pol = self.execution
        noise = self.noise
        uses_cpu = ex_pol is not None and ex_pol.uses_cpu
        cpu_blocks = uses_cpu and ex_pol.cpu_blocks_host
        resident = cache.resident
        tcpu, act_d2h, act_h2d = st.cpu_expert, st.act_d2h, st.act_h2d
        act_b = self.act_bytes_per_token
        B = plan.batch_size
        cpu_r, gpu_d2h = "cpu0", "gpu0.d2h"
        cpu_free = d2h_free = 0.0
        pend_rd = 0.0  # the next GPU op waits for CPU expert results until then
        cpu_hold = 0.0  # the host thread computed CPU experts until then (Fiddler)
        d_end = 0.0
        busy_cpu = busy_d2h = 0.0
        bytes_d2h = bytes_act_h2d = n_cpu = 0
        col_cpu = [0] * C
        # CPU thread workers (moesim.perf.cpu): their free times; the time the previous layer's
        # MoE input reached the host (pre-calculation starts from it); swap / pre-calc counters
        cpu_model = self.cpu_model if uses_cpu else None
        cpu_wfree = [0.0] * len(cpu_model.workers) if cpu_model is not None else None
        cpu_share = cpu_model.threads / hw.cpu.cores if cpu_model is not None else 1.0
        moe_in_host = 0.0
        n_swaps = n_pre = n_pre_wasted = 0
        prefetcher = self.prefetcher
        pf_unused: dict = {}  # prefetched keys not used yet -> issued in a measured step?
        pf_issued = pf_used = pf_wasted = pf_pred = pf_pred_right = pf_true = 0
        pf_evicted = 0
        stream_slot: dict = {}
        tbi = 0

        def issue_copy(key, e, slot, kind, s, layer, measured, dur=None, nbytes=None, lvl=0):
            # host issues one expert copy; it starts when the engine, the host and its slot are free
            nonlocal host, cp, busy_cp, busy_host, n_copies, bytes_h2d, n_dense, bytes_dense
            nonlocal ssd_free, busy_ssd, bytes_ssd
            host += iota
            cs = cp
            if host > cs:
                cs = host
            if slot > cs:
                cs = slot
            if dur is None:
                if kbytes is None:
                    dur, nbytes = copy_s, xb
                else:  # heterogeneous experts: this expert's own bytes
                    dur, nbytes = kcopy[key], kbytes[key]
            blk = pageable
            from_ssd = on_ssd and key >= 0
            if tier_of is not None and key >= 0:
                tr = tier_of[key]
                from_ssd = tr == 2
                if tr == 1:  # pageable DRAM: the size-dependent pageable rate, and the host waits
                    d = ct_memo.get((nbytes, False))
                    if d is None:
                        d = ct_memo[(nbytes, False)] = self.copy_time(nbytes, False)
                    dur, blk = d, True
                if measured:
                    ti_loads[tr] += 1
                    ti_bytes[tr] += nbytes
            if noise is not None:
                dur *= noise.copy(nbytes)
            if from_ssd:
                # the expert's home copy is on flash: a read first (into a DRAM bounce buffer,
                # pipelined with earlier link copies), or one direct transfer with GPUDirect
                rs = ssd_free if ssd_free > host else host
                rdur = ssd_lat + nbytes * ssd_inv
                if gds:
                    if rs > cs:
                        cs = rs
                    dur = max(dur, rdur)
                    rs = cs
                re_ = rs + rdur
                ssd_free = re_ if not gds else cs + dur
                if re_ > cs:
                    cs = re_
                if rec:
                    tl.append((ssd_r, "ssd_read", rs, rs + rdur, s, layer, e, nbytes))
                if measured:
                    busy_ssd += rdur
                    bytes_ssd += nbytes
            ce = cs + dur
            if blk:
                host = ce  # a pageable copy blocks the host thread until it is done
            cp = ce
            ready[key] = ce
            copies.append((cs, ce))
            if uses_cpu:
                copies_cpu.append((cs, ce))
            if rec:
                tl.append((gpu_h2d, kind, cs, ce, s, layer, e, nbytes))
            if measured:
                busy_cp += dur
                busy_host += iota + (ce - cs if blk else 0.0)
                if key < 0:  # streamed dense weights
                    n_dense += 1
                    bytes_dense += nbytes
                else:
                    n_copies += 1
                    bytes_h2d += nbytes
                    lv_loads[lvl] += 1
                    lv_bytes[lvl] += nbytes

        def issue_stream(key, e, s, layer, measured):
            # a streamed expert takes the next transient buffer of the ring
            nonlocal tbi
            b = tbi
            tbi = (tbi + 1) % nbuf
            stream_slot[e] = b
            lv = lvl_now.get(e) if lvl_now else None
            if lv:
                issue_copy(key, e, tbuf[b], "copy_stream", s, layer, measured, pr_copy[lv], pr_b[lv], lv)
            else:
                issue_copy(key, e, tbuf[b], "copy_stream", s, layer, measured)

        def issue_dense(c2, s, measured):
            # dense weights of stage c2 of step s into the double buffer the stage before last used
            issue_copy(-1 - c2, -1, dense_buf[(s * C + c2) & 1], "copy_dense", s, mlayers[c2], measured,
                       st.dense_copy[c2], st.dense_bytes[c2])
            dense_ready[c2] = ready.pop(-1 - c2)

        def dropped(keys):
            # evicted keys: a prefetched expert evicted before any use is wasted
            nonlocal pf_wasted
            for v in keys:
                ready.pop(v, None)
                flag = pf_unused.pop(v, None)
                if flag:
                    pf_wasted += 1

        def room_free_at(evicted, end_of=last_end.get):
            # when the cache room that evicted keys leave is free: the end of their last kernel
            # (0 for a key that never ran); a copy into that room starts no earlier
            slot = 0.0
            for v in evicted:
                le = end_of(v, 0.0)
                if le > slot:
                    slot = le
            return slot

        def prefetch(s, c, experts, t, measured):
            # after layer c's router: load what the prefetcher predicts, behind the demand loads
            nonlocal pf_issued, pf_pred, pf_pred_right, pf_true, pf_evicted
            want = prefetcher.plan(s, c, experts)
            if not want:
                return
            protect = {c * E + e for e in experts}
            protect.update(c2 * E + e for c2, e in want)
            cols = set()
            for c2, e in want:
                cols.add(c2)
                # a precision policy may fix the format a prefetched copy loads at (EdgeMoE)
                plv = prec.prefetch_level(c2, e) if prec is not None else 0
                ok, evicted = cache.prefetch(c2, e, t, protect, pr_b[plv] if plv else None)
                if evicted:
                    dropped(evicted)
                    if measured:
                        pf_evicted += len(evicted)
                if ok:
                    key = c2 * E + e
                    slot = room_free_at(evicted)
                    if plv:
                        issue_copy(key, e, slot, "prefetch", s, mlayers[c2], measured, pr_copy[plv], pr_b[plv], plv)
                        key_lvl[key] = plv
                    else:
                        issue_copy(key, e, slot, "prefetch", s, mlayers[c2], measured)
                    pf_unused[key] = measured
                    if measured:
                        pf_issued += 1
            if measured:  # prediction quality, whatever was resident already
                for c2 in cols:
                    truth = set(plan.row(s, col_src[c2])[0])
                    guess = {e for cc, e in want if cc == c2}
                    pf_pred += len(guess)
                    pf_pred_right += len(guess & truth)
                    pf_true += len(truth)

        g_c = c_w = h_c = u_c = 0.0  # critical-path parts of the current step
        prev = 0.0  # end of the previous op on the compute stream, or the step's start

        def gpu_op(kind, G, n, lm, rd, factor, s, layer, expert, measured, rd_is_cpu=False):
            # the host launches an op of n equal kernels (lm host seconds each, G GPU seconds in
            # all) that also waits for time rd (a copy, or CPU results); returns its end.
            nonlocal host, gpu, prev, g_c, c_w, h_c, u_c, busy_gpu, busy_host, cpu_hold
            if noise is not None:
                G *= noise.kernel()
            h0 = host
            hb = h0 + lm
            start = gpu if gpu > hb else hb
            if rd > start:
                start = rd
            G = stretch(start, G, factor)
            end = start + G
            lb = h0 + n * lm + G / n
            if lb > end:
                end = lb
            host = h0 + n * lm
            if start > prev:
                gap = start - prev
                if rd_is_cpu:
                    # waiting for CPU experts: up to their results, or while the host computed them
                    lim = rd if rd > cpu_hold else cpu_hold
                    part = (start if start < lim else lim) - prev
                    if part > 0.0:
                        u_c += part
                        gap -= part
                    cpu_hold = 0.0
                    if gap > 0.0:
                        h_c += gap
                elif rd >= hb and rd > prev:
                    c_w += gap
                else:
                    h_c += gap
            g_c += G
            h_c += end - start - G
            gpu = prev = end
            if rec:
                tl.append((gpu_c, kind, start, end, s, layer, expert, 0))
                tl.append((host_r, "launch", h0, host, s, layer, expert, 0))
            if measured:
                busy_gpu += end - start
                busy_host += host - h0
            return end

        # ---- whole blocks on the CPU (llama.cpp -ngl): the hidden state is on the host from time
        # h_host (-1: on the GPU); ggml runs the CPU splits on the host thread, the GPU waits
        off = st.offload
        h_host = -1.0

        def to_gpu(s, layer, measured):
            # the hidden state crosses to the GPU (a CPU block followed by a GPU one); returns when
            # it lands, which the next GPU op waits for
            nonlocal host, cp, h_host, busy_cp, busy_host, bytes_act_h2d
            host += iota
            rs = cp if cp > host else host
            if h_host > rs:
                rs = h_host
            d = act_h2d[B] if noise is None else act_h2d[B] * noise.copy(B * act_b)
            re_ = rs + d
            cp = re_
            copies.append((rs, re_))
            copies_cpu.append((rs, re_))
            h_host = -1.0
            if rec:
                tl.append((gpu_h2d, "act_h2d", rs, re_, s, layer, -1, B * act_b))
            if measured:
                busy_cp += d
                busy_host += iota
                bytes_act_h2d += B * act_b
            return re_

        def to_host(s, layer, measured):
            # the hidden state crosses to the host (a GPU segment followed by a CPU one)
            nonlocal host, d2h_free, h_host, busy_d2h, busy_host, bytes_d2h
            host += iota
            ds = d2h_free if d2h_free > host else host
            if gpu > ds:
                ds = gpu
            d = act_d2h[B] if noise is None else act_d2h[B] * noise.copy(B * act_b, "d2h")
            d2h_free = h_host = ds + d
            if rec:
                tl.append((gpu_d2h, "act_d2h", ds, h_host, s, layer, -1, B * act_b))
            if measured:
                busy_d2h += d
                busy_host += iota
                bytes_d2h += B * act_b

        def cpu_op(kind, dur, s, layer, measured):
            # a CPU segment (blocks, output layer) computed by the host thread; returns its end
            nonlocal host, cpu_free, cpu_hold, h_host, busy_cpu, busy_host
            t0 = host if host > h_host else h_host
            if cpu_free > t0:
                t0 = cpu_free
            if noise is not None:
                dur *= noise.cpu()
            dur = stretch(t0, dur, f_dram, copies_cpu)
            te = t0 + dur
            if rec:
                tl.append((cpu_r, kind, t0, te, s, layer, -1, 0))
            if measured:
                busy_cpu += dur
                busy_host += te - host
            host = cpu_free = cpu_hold = h_host = te
            return te

        t_access = 0
        step_start = 0.0
        progress = self.progress
        dbase, dmemb, dblocks = st.dense_base, st.dense_membound, st.dense_blocks
        tbase, tmemb = st.tail_base, st.tail_membound
        s = -1
        while True:
            s += 1
            idle = 0.0
            if serving is None:
                if s >= S:
                    break
                attn_s = st.attn[s]
            else:
                # ---- serving: the scheduler forms this step now (it depends on when the last one
                # ended and on who has arrived); with nothing to run, wait for the next arrival
                stp = serving.next_step(env.now)
                while stp is None and not serving.done:
                    serving.waiter = env.event()
                    yield serving.waiter
                    events += 1
                    serving.stats.idle_waits += 1
                    stp = serving.next_step(env.now)
                if stp is None:
                    break
                if env.now > host:
                    idle = env.now - step_start  # the GPU and host had nothing to do
                    host = env.now
                attn_s = stp.attn
                dbase, dmemb = stp.dense_base, stp.dense_membound
                tbase, tmemb = stp.tail_base, stp.tail_membound
            measured = s >= warm
            g_c = c_w = h_c = u_c = 0.0
            prev = host if idle else step_start
            if off is not None:
                h_host = host if off.start_on_host else -1.0  # the token is embedded where block 0 runs
            for c in range(C):
                layer = mlayers[c]
                # ---- dense stage ---------------------------------------------------------------
                if off is not None:  # whole-layer offload: the stage's leading blocks on the CPU
                    if off.cpu_blocks[c]:
                        if h_host < 0.0:
                            to_host(s, layer, measured)
                        d_end = cpu_op("cpu_dense", off.cpu_base[c] + off.cpu_blocks[c] * off.attn[s], s, layer,
                                       measured)
                    if dblocks[c] and h_host >= 0.0:
                        pend_rd = to_gpu(s, layer, measured)
                if off is None or dblocks[c]:
                    G = dbase[c] + dblocks[c] * attn_s
                    if eager:
                        n, lm = st.dense_blocks[c] * dk, lam
                    else:
                        n, lm = st.dense_blocks[c], lam_g
                    rd, rd_cpu = pend_rd, True
                    if stream_dense:
                        if dense_ready[c] < 0.0:  # the run's first stage: nothing prefetched it
                            issue_dense(c, s, measured)
                        if dense_ready[c] > rd:
                            rd, rd_cpu = dense_ready[c], False
                    d_end = gpu_op("dense", G, n, lm, rd, f_mem if dmemb[c] else f_cmp, s, layer,
                                   -1, measured, rd_cpu)
                    pend_rd = 0.0
                    if stream_dense:
                        dense_buf[(s * C + c) & 1] = d_end  # its buffer is free once the stage has run
                        dense_ready[c] = -1.0
                # ---- router read-back --------------------------------------------------------------
                if off is not None and off.moe_on_cpu[c]:
                    yield env.timeout(host - env.now)  # the router ran on the CPU: the host has it
                    events += 1
                elif wait_router:
                    t_ready = gpu if gpu > host else host
                    host = t_ready + rho
                    if rec:
                        tl.append((host_r, "router_readback", t_ready, host, s, layer, -1, 0))
                    if measured:
                        busy_host += rho
                    yield env.timeout(host - env.now)
                    events += 1
                # ---- cache decision ---------------------------------------------------------------
                experts, counts = plan.row(s, col_src[c])
                cnt = dict(zip(experts, counts))
                base = c * E
                cpu_set = None
                if uses_cpu:
                    swaps = ex_pol.migrations(c, lambda e: base + e in resident)
                    for hot, cold in swaps:
                        # a CPU expert copied into a GPU expert's slot (DAOP): the cold one goes
                        ok, evicted = cache.prefetch(c, hot, t_access, set(resident) - {base + cold})
                        if evicted:
                            dropped(evicted)
                        if ok:
                            slot = room_free_at(evicted)
                            issue_copy(base + hot, hot, slot, "swap", s, layer, measured)
                            if measured:
                                n_swaps += 1
                                n_evict += len(evicted)
                    cpu_set = ex_pol.split(c, experts, counts, lambda e: base + e in resident)
                    # this layer's MoE input on the host (the next layer's pre-calculation starts there)
                    moe_prev = moe_in_host
                    moe_in_host = (host if host > d_end else d_end) + act_d2h[B]
                if prec is not None:
                    # the policy picks a level (or a skip) per miss, and top-ups of resident copies
                    w_of = mean_weight(s, c, experts, counts)
                    sizes = {}
                    skip = set()
                    lvl_now.clear()
                    miss_w, res_w = [], []
                    for e in experts:
                        key = base + e
                        if key in resident:
                            lv = key_lvl.get(key, 0)
                            if lv and key_bytes[key] != pr_b[lv]:
                                lv = 0  # re-inserted at full precision since (a prefetch, a swap)
                            if lv:
                                lvl_now[e] = lv
                            res_w.append((e, w_of[e], lv))
                        elif not (cpu_set and e in cpu_set):
                            miss_w.append((e, w_of[e]))
                    miss_lv, tops = prec.plan_layer(c, miss_w, res_w)
                    for e, lv in miss_lv.items():
                        if lv is None:
                            skip.add(e)
                        elif lv:
                            sizes[e] = pr_b[lv]
                            lvl_now[e] = lv
                    run_gpu = [e for e in experts if e not in skip and not (cpu_set and e in cpu_set)]
                    res = cache.access(c, run_gpu, t_access, sizes or None)
                    for e, _ in res.loads:
                        key_lvl[base + e] = lvl_now.get(e, 0)
                    if tops:
                        protect = {base + e for e in experts}
                        for e, lv in tops.items():
                            key = base + e
                            if key not in resident:
                                continue
                            old = key_bytes[key]
                            ok, evicted = grow_entry(cache, c, key, pr_b[lv], protect)
                            if evicted:
                                dropped(evicted)
                                if measured:
                                    n_evict += len(evicted)
                            if not ok:
                                continue
                            slot = room_free_at(evicted)  # the added slices go to room the victims free
                            nb = pr_b[lv] - old
                            d = ct_memo.get((nb, not pageable))
                            if d is None:
                                d = ct_memo[(nb, not pageable)] = self.copy_time(nb, not pageable)
                            issue_copy(key, e, slot, "copy_topup", s, layer, measured, d, nb, lv)
                            key_lvl[key] = lv
                            if lv:
                                lvl_now[e] = lv
                            else:
                                lvl_now.pop(e, None)
                            if measured:
                                n_topup += 1
                                bytes_topup += nb
                    if measured:
                        for e in experts:
                            m_ = w_of[e] * cnt[e]
                            q_total += m_
                            if e in skip:
                                q_skip += m_
                            elif e in lvl_now:
                                q_low += m_
                                lv_mass[lvl_now[e]] += m_
                            elif not (cpu_set and e in cpu_set):
                                lv_mass[0] += m_
                        n_skip += len(skip)
                        n_acc += len(skip)
                        n_miss += len(skip)
                        col_miss[c] += len(skip)
                        # misses loaded below level 0, cached or streamed through a transient buffer
                        n_low_loads += sum(1 for e, _ in res.loads if e in sizes)
                        n_low_loads += sum(1 for e in res.streamed if e in sizes)
                elif cpu_set:
                    res = cache.access(c, [e for e in experts if e not in cpu_set], t_access)
                else:
                    res = cache.access(c, experts, t_access)
                t_access += 1
                if pf_unused:
                    for e in res.hits:
                        flag = pf_unused.pop(base + e, None)
                        if flag:
                            pf_used += 1
                    for _, ev in res.loads:
                        if ev:
                            dropped(ev)
                    if res.orphans:
                        dropped(res.orphans)
                # ---- copies: demand loads first, then streamed experts ------------------------------
                for e, evicted in res.loads:
                    slot = room_free_at(evicted)
                    lv = lvl_now.get(e) if lvl_now else None
                    if lv:
                        issue_copy(base + e, e, slot, "copy", s, layer, measured, pr_copy[lv], pr_b[lv], lv)
                    else:
                        issue_copy(base + e, e, slot, "copy", s, layer, measured)
                streamed = res.streamed
                ns = len(streamed)
                # a streamed copy needs a free transient buffer; those beyond the ring's size are
                # issued just before their kernel, once the buffer's previous kernel is known
                for i in range(min(nbuf, ns)):
                    issue_stream(base + streamed[i], streamed[i], s, layer, measured)
                if prefetcher is not None:
                    prefetch(s, c, experts, t_access - 1, measured)
                if stream_dense:  # the next stage's dense weights, behind this layer's expert loads
                    if c + 1 < C:
                        issue_dense(c + 1, s, measured)
                    elif s + 1 < S if serving is None else serving.may_continue():
                        issue_dense(0, s + 1, s + 1 >= warm)  # counted with the step it serves
                # ---- expert kernels -----------------------------------------------------------------------
                loaded = [e for e, _ in res.loads]
                if group_launch:
                    ops = []
                    if res.hits:
                        ops.append(("expert_hit", res.hits))
                    if loaded:
                        ops.append(("expert_loaded", loaded))
                    n, lm = 1, lam_grp
                else:
                    ops = [("expert_hit", [e]) for e in res.hits]
                    ops += [("expert_loaded", [e]) for e in loaded]
                    n, lm = n_exp, lam_exp
                ops += [("expert_streamed", [e]) for e in streamed]
                si = 0
                for kind, grp in ops:
                    if kind == "expert_streamed":
                        if si >= nbuf:
                            issue_stream(base + grp[0], grp[0], s, layer, measured)
                        si += 1
                        n_op, lm_op = (1, lam_grp) if group_launch else (n, lm)
                    else:
                        n_op, lm_op = n, lm
                    T = 0.0
                    mb = False
                    rd = 0.0
                    for e in grp:
                        k = cnt[e]
                        if ktab is None:
                            lv = lvl_now.get(e, 0) if lvl_now else 0
                            t_ = pr_t[lv][k] if lv else texp[k]
                            T += t_
                            if measured:
                                lv_time[lv] += t_
                            mb = mb or tmb[k]
                        else:  # heterogeneous experts: this expert's size class's table
                            t_ = ktab[base + e][k]
                            T += t_
                            if measured:
                                lv_time[0] += t_
                            mb = mb or kmb[base + e][k]
                        r = ready.pop(base + e, 0.0)
                        if r > rd:
                            rd = r
                    if fused and len(grp) > 1:
                        T -= (len(grp) - 1) * xfix  # one grouped kernel: fixed time once
                    end = gpu_op(kind, T, n_op, lm_op, rd, f_mem if mb else f_cmp, s, layer,
                                 grp[0] if len(grp) == 1 else -1, measured)
                    for e in grp:
                        b = stream_slot.pop(e, None)
                        if b is not None:
                            tbuf[b] = end
                        else:
                            last_end[base + e] = end
                # ---- experts on the CPU: activations down, CPU compute, results up ---------------------
                if cpu_set:
                    ntok = 0
                    for e in cpu_set:
                        ntok += cnt[e]
                    if ntok > B:
                        ntok = B
                    on_cpu = off is not None and off.moe_on_cpu[c]  # a CPU block: no activation copies
                    if on_cpu:
                        ds = de = d_end
                    else:
                        host += iota
                        ds = d2h_free
                        if host > ds:
                            ds = host
                        if d_end > ds:
                            ds = d_end
                        de = ds + (act_d2h[ntok] if noise is None else act_d2h[ntok] * noise.copy(ntok * act_b, "d2h"))
                        d2h_free = de
                    if cpu_blocks and de > host:
                        host = de  # the host thread waits for the activations it computes on
                    if cpu_model is None:
                        cs0 = cs = cpu_free if cpu_free > de else de
                        for e in experts:
                            if e in cpu_set:
                                dur = stretch(cs, tcpu[cnt[e]] if noise is None else tcpu[cnt[e]] * noise.cpu(),
                                              f_dram, copies_cpu)
                                if rec:
                                    tl.append((cpu_r, "cpu_expert", cs, cs + dur, s, layer, e, 0))
                                cs += dur
                        cpu_free = cs
                        cpu_work = cs - cs0
                    else:
                        # thread workers (moesim.perf.cpu): experts run concurrently, sharing DRAM;
                        # pre-calculated ones (and wrong guesses) start from the previous layer's input
                        early, wasted = ex_pol.precalc(c, cpu_set, cnt)
                        jobs = [(moe_prev, k, -1, 1.0) for k in wasted]
                        ids = [-1] * len(wasted)
                        for e in experts:
                            if e in cpu_set:
                                jobs.append((moe_prev if e in early else de, cnt[e], base + e,
                                             1.0 if kbytes is None else kbytes[base + e] / xb))
                                ids.append(e)
                        order = sorted(range(len(jobs)), key=lambda i: jobs[i][0])
                        jobs = [jobs[i] for i in order]
                        ids = [ids[i] for i in order]
                        first = jobs[0][0]
                        while copies_cpu and copies_cpu[0][1] <= first:
                            copies_cpu.popleft()
                        scale = None if noise is None else [noise.cpu() for _ in jobs]
                        runs = cpu_model.schedule(jobs, cpu_wfree, copies_cpu, f_dram, scale)
                        cs = 0.0
                        cpu_work = 0.0
                        for e, (a, b, w) in zip(ids, runs):
                            if e >= 0 and b > cs:
                                cs = b  # results go back once the last real expert is done
                            cpu_work += (b - a) * cpu_share
                            if rec:
                                tl.append((f"{cpu_r}.w{w}" if len(cpu_wfree) > 1 else cpu_r,
                                           "cpu_expert" if e >= 0 else "cpu_precalc_wasted", a, b, s, layer, e, 0))
                        if cs > cpu_free:
                            cpu_free = cs
                        if measured:
                            n_pre += len(early)
                            n_pre_wasted += len(wasted)
                    if cpu_blocks and cs > host:
                        if measured:
                            busy_host += cs - host
                        host = cpu_hold = cs
                    if on_cpu:
                        # the results stay on the host for the next CPU segment (or the copy to the GPU)
                        if cs > h_host:
                            h_host = cs
                    else:
                        rs = cp if cp > cs else cs
                        re_ = rs + (act_h2d[ntok] if noise is None else act_h2d[ntok] * noise.copy(ntok * act_b))
                        cp = re_
                        copies.append((rs, re_))
                        copies_cpu.append((rs, re_))
                        pend_rd = re_
                        if rec:
                            tl.append((gpu_d2h, "act_d2h", ds, de, s, layer, -1, ntok * act_b))
                            tl.append((gpu_h2d, "act_h2d", rs, re_, s, layer, -1, ntok * act_b))
                        if measured:
                            busy_d2h += de - ds
                            busy_cp += re_ - rs
                            bytes_d2h += ntok * act_b
                            bytes_act_h2d += ntok * act_b
                    if measured:
                        busy_cpu += cpu_work
                        ncpu = len(cpu_set)
                        n_cpu += ncpu
                        n_acc += ncpu
                        n_miss += ncpu
                        col_miss[c] += ncpu
                        col_cpu[c] += ncpu
                # ---- counters ---------------------------------------------------------------------------
                if measured:
                    nh = len(res.hits)
                    nl = len(res.loads)
                    ns = len(res.streamed)
                    ne = 0
                    for _, ev in res.loads:
                        ne += len(ev)
                    ne += len(res.orphans)
                    n_acc += nh + nl + ns
                    n_hit += nh
                    n_miss += nl + ns
                    n_stream += ns
                    n_evict += ne
                    col_hits[c] += nh
                    col_miss[c] += nl + ns
                    col_loads[c] += nl
                    col_stream[c] += ns
                    col_evict[c] += ne
                    col_tokens[c] += sum(counts)
                    col_distinct[c] += len(experts)
            # ---- tail: trailing dense blocks, final norm, LM head, sampling -------------------------------
            if off is not None:  # whole-layer offload: leading trailing blocks on the CPU
                if off.tail_cpu_blocks:
                    if h_host < 0.0:
                        to_host(s, -1, measured)
                    cpu_op("cpu_dense", off.tail_cpu_base + off.tail_cpu_blocks * off.attn[s], s, -1, measured)
                if (st.tail_blocks or off.head_cpu is None) and h_host >= 0.0:
                    pend_rd = to_gpu(s, -1, measured)
            if off is None or off.head_cpu is None:
                G = tbase + st.tail_blocks * attn_s
                if eager:
                    n, lm = st.tail_blocks * dk + rt.head_kernels, lam
                else:
                    n, lm = st.tail_blocks + 1, lam_g
                gpu_op("head", G, n, lm, pend_rd, f_mem if tmemb else f_cmp, s, -1, -1, measured, True)
                pend_rd = 0.0
                t_ready = gpu if gpu > host else host
                if rec:
                    tl.append((host_r, "token_readback", t_ready, t_ready + rho, s, -1, -1, 0))
                host = t_ready + rho
                h_c += host - gpu
            else:
                # the output layer on the CPU, after the GPU's trailing blocks (if any)
                if st.tail_blocks:
                    G = tbase + st.tail_blocks * attn_s
                    n, lm = (st.tail_blocks * dk, lam) if eager else (st.tail_blocks, lam_g)
                    gpu_op("dense", G, n, lm, pend_rd, f_mem if tmemb else f_cmp, s, -1, -1, measured, True)
                    pend_rd = 0.0
                if h_host < 0.0:
                    if pend_rd > host:  # CPU expert results of the last GPU block land first
                        host = pend_rd
                    to_host(s, -1, measured)
                pend_rd = 0.0
                t_ready = cpu_op("cpu_head", off.head_cpu, s, -1, measured)
                if rec:
                    tl.append((host_r, "token_readback", t_ready, t_ready + rho, s, -1, -1, 0))
                host = t_ready + rho
                u_c += t_ready - prev  # the hidden state's way down and the CPU's output layer
                h_c += rho
            if measured:
                busy_host += rho
            yield env.timeout(host - env.now)
            events += 1
            step_end.append(host)
            parts.append((g_c, c_w, h_c, u_c, 0.0, idle))
            step_start = host
            if serving is not None:
                serving.finish_step(host)
                if progress is not None and (s & 63) == 63:
                    progress(serving.finished, len(serving.requests))
            elif progress is not None and (s & 63) == 63:
                progress(s + 1, S)
        S = s
        if progress is not None:
            if serving is None:
                progress(S, S)
            else:
                progress(serving.finished, len(serving.requests))

        step_end = np.array(step_end, dtype=np.float64)
        parts = np.array(parts, dtype=np.float64).reshape(S, len(CP_KEYS))
        measure_start = step_end[warm - 1] if warm > 0 else 0.0
        self._result = EngineResult(
            steps=S,
            warmup_steps=warm,
            batch_size=plan.batch_size,
            step_end_s=step_end,
            step_parts_s=parts,
            busy_s={
                gpu_c: busy_gpu,
                gpu_h2d: busy_cp,
                "gpu0.d2h": busy_d2h,
                host_r: busy_host,
                "cpu0": busy_cpu,
                link_r: busy_cp + busy_d2h,
                **({ssd_r: busy_ssd} if on_ssd else {}),
            },
            counters={
                "accesses": n_acc,
                "hits": n_hit,
                "misses": n_miss,
                "streamed": n_stream,
                "evictions": n_evict + pf_evicted,
                "prefetch_issued": pf_issued,
                "prefetch_used": pf_used,
                "prefetch_wasted": pf_wasted + sum(1 for f in pf_unused.values() if f),
                "prefetch_predicted": pf_pred,
                "prefetch_predicted_right": pf_pred_right,
                "prefetch_truth": pf_true,
                "copies": n_copies,
                "bytes_h2d": bytes_h2d + bytes_act_h2d + bytes_dense,
                "bytes_h2d_dense": bytes_dense,
                "dense_copies": n_dense,
                "bytes_h2d_experts": bytes_h2d,
                "bytes_d2h": bytes_d2h,
                "bytes_ssd": bytes_ssd,
                "cpu_experts": n_cpu,
                "cpu_gpu_swaps": n_swaps,
                "precalc_experts": n_pre,
                "precalc_wasted": n_pre_wasted,
                "skipped": n_skip,
                "low_precision_loads": n_low_loads,
                "precision_levels": {"loads": lv_loads, "bytes": lv_bytes, "expert_gpu_s": lv_time,
                                     "gate_mass": lv_mass, "topups": n_topup, "bytes_topup": bytes_topup},
                "tiers": None if tier_of is None else {"loads": ti_loads, "bytes": ti_bytes},
                "gate_mass_total": q_total,
                "gate_mass_low": q_low,
                "gate_mass_skipped": q_skip,
            },
            per_column={
                "hits": np.array(col_hits),
                "misses": np.array(col_miss),
                "loads": np.array(col_loads),
                "streamed": np.array(col_stream),
                "evictions": np.array(col_evict),
                "routed_tokens": np.array(col_tokens),
                "distinct_experts": np.array(col_distinct),
                "cpu_experts": np.array(col_cpu),
            },
            events=events,
            timeline=tl if rec else [],
            measure_start_s=float(measure_start),
        )
