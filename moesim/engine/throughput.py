"""Throughput-mode offloaded decode: large batches of a model that does not fit in GPU memory.

The throughput systems (MoE-Lightning, Klotski, MoE-Gen; ``moesim/policies/execution``) decode
hundreds to thousands of sequences together and stream the weights of every block through the GPU
once per decode step (or keep a few blocks resident); what they differ in is how compute hides that
weight I/O: which device runs attention and where the KV cache lives, how the sequences are cut
into micro-batches or batches, which weights are copied when, and in what order.

Each such policy turns the run into a *schedule*: a :class:`Dag` of ops, each on one resource —
the GPU compute stream (``gpu0.compute``), the host-to-device and device-to-host copy engines
(``gpu0.h2d``, ``gpu0.d2h``) or the CPU's attention workers (``cpu0``) — with the ops it waits for.
Ops are added in one global order in which every dependency comes first, and each resource runs its
ops in that order (a CUDA stream, a FIFO copy engine): an op starts when its resource is free and
its dependencies have finished. That order cannot deadlock (the earliest unfinished op always has
its dependencies and its resource's earlier ops finished). :class:`ThroughputEngine` runs the
schedule as SimPy processes, one per resource, with one event per op (per (batch, block, stage) and
per transfer); no event per token or per expert-token pair — per-expert arithmetic is numpy.

Op times come from the same predictor as the single-GPU engine (dense and attention rooflines,
expert times by token count from measured tables or the roofline), the link model (setup + bytes
at the link's rate) and a CPU roofline for attention on the CPU (KV bytes over DRAM bandwidth, or
FLOPs over the CPU's peak x efficiency, whichever is longer). Not modelled here: host launch and
read-back costs (negligible per op at these batch sizes), copy/compute interference, both copy
directions sharing the link (each engine keeps its one-way rate), prefill.

Critical path: every instant of the run lies on the GPU stream's timeline, either inside a GPU op
(``gpu_compute``) or in a gap before one. A gap is walked back from the dependency that finished
last: the time that op ran is charged to its resource (a copy: ``copy_wait``; CPU attention:
``cpu_attention``), the time before it started to what held it back (its own last dependency or its
resource's previous op), and so on to the start of the gap; the time after the last GPU op likewise
from the op that ends the run. The parts sum to the elapsed time exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import simpy

from moesim.engine.single_gpu import CP_KEYS, EngineResult
from moesim.errors import InputError
from moesim.hardware.links import LinkModel
from moesim.perf.predictor import Predictor

GIB = 2**30
GPU, H2D, D2H, CPU = "gpu0.compute", "gpu0.h2d", "gpu0.d2h", "cpu0"
RESOURCES = (GPU, H2D, D2H, CPU)
#: critical-path causes of a throughput run: the single-GPU keys plus CPU attention
TP_CP_KEYS = CP_KEYS + ("cpu_attention",)
_CAUSE = {H2D: "copy_wait", D2H: "copy_wait", CPU: "cpu_attention", GPU: "gpu_compute"}


class Dag:
    """The ops of a throughput run in issue order (see the module docstring).

    Parallel lists, one entry per op: resource, kind, duration (s), dependencies (op ids, all
    smaller than the op's own id), decode step, model block, batch (micro-batch, batch or chunk
    index), bytes moved, tokens processed, routed-expert choices served (token x expert pairs
    whose expert FFN the op computes), expert id (-1 when not one expert)."""

    def __init__(self):
        self.res: list = []
        self.kind: list = []
        self.dur: list = []
        self.deps: list = []
        self.step: list = []
        self.layer: list = []
        self.batch: list = []
        self.nbytes: list = []
        self.tokens: list = []
        self.choices: list = []
        self.expert: list = []

    def __len__(self) -> int:
        return len(self.res)

    def add(self, res: str, kind: str, dur: float, deps=(), *, step: int, layer: int = -1, batch: int = -1,
            nbytes: int = 0, tokens: int = 0, choices: int = 0, expert: int = -1) -> int:
        """Append an op; returns its id. ``deps`` may hold ``None`` (no dependency)."""
        i = len(self.res)
        d = tuple(sorted({int(x) for x in deps if x is not None}))
        if d and d[-1] >= i:  # pragma: no cover - a policy bug, not user input
            raise ValueError(f"op {i} ({kind}) depends on a later op {d[-1]}")
        if res not in RESOURCES:  # pragma: no cover
            raise ValueError(f"unknown resource {res!r}")
        if dur < 0 or not math.isfinite(dur):  # pragma: no cover
            raise ValueError(f"op {i} ({kind}) has duration {dur}")
        self.res.append(res)
        self.kind.append(kind)
        self.dur.append(float(dur))
        self.deps.append(d)
        self.step.append(int(step))
        self.layer.append(int(layer))
        self.batch.append(int(batch))
        self.nbytes.append(int(nbytes))
        self.tokens.append(int(tokens))
        self.choices.append(int(choices))
        self.expert.append(int(expert))
        return i


class ThroughputCosts:
    """Op times (seconds) and sizes (bytes) of one model on one machine for the throughput engine.

    Blocks are the model's transformer blocks (``0 .. num_layers-1``); a block's *dense* weights
    are everything but its routed experts (attention projections, router, shared experts, or the
    dense FFN). Attention is split where the CPU can take it: *pre* (the QKV projections) and *post*
    (output projection, router, shared experts or dense FFN) run on the GPU, the attention core on
    either device. All times are memoised by their arguments."""

    def __init__(self, model, hw, runtime):
        self.m, self.hw = model, hw
        self.pred = Predictor(model, hw)
        self.link = LinkModel(hw)
        self.pinned = runtime.host_memory == "pinned"
        eager = runtime.launch_mode == "eager"
        dk = runtime.dense_kernels_per_layer if eager else 2
        self.k_pre = max(1, dk // 3)
        self.k_post = max(1, dk - self.k_pre)
        self.k_exp = runtime.kernels_per_expert if eager else 1
        self.k_head = runtime.head_kernels if eager else 1
        m = model
        a = m.attention
        bpp = m.bytes_per_param
        h = m.hidden_size
        self.bpp = bpp
        self.L = m.num_layers
        self.E, self.K = m.num_experts, m.top_k
        self.moe_blocks = frozenset(m.moe_layers)
        if a.kind == "mla":
            q_dim = a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
            o_dim = a.num_heads * a.v_head_dim
        else:
            hd = a.head_dim or h // a.num_heads
            q_dim = o_dim = a.num_heads * hd
        self.o_params = o_dim * h
        self.pre_params = m.attention_params - self.o_params
        self.kvl = m.kv_bytes_per_token_layer  # KV bytes of one token in one block
        self.kv_token = m.kv_bytes_per_token  # over all blocks
        #: bytes per token leaving the GPU for CPU attention: the query and the new K/V
        self.qkv_bytes = int(q_dim * bpp + self.kvl)
        #: bytes per token of the attention output coming back
        self.attn_out_bytes = int(o_dim * bpp)
        self.hidden_bytes = int(h * bpp)
        self.expert_bytes = m.expert_bytes
        self.dense_w = [int(round(m.block_dense_params(b) * bpp)) for b in range(self.L)]
        self.expert_w = [self.E * m.expert_bytes if b in self.moe_blocks else 0 for b in range(self.L)]
        self.block_w = [d + e for d, e in zip(self.dense_w, self.expert_w)]
        #: embedding table and LM head: always resident on the GPU
        self.resident_w = int(round(m.embedding_params * m.embedding_bytes_per_param))
        self._work_per_token = (q_dim + 2 * o_dim + 4 * h + 3 * self.K * m.moe_intermediate_size) * bpp
        self._memo: dict = {}

    # ----- memoisation -------------------------------------------------------------------------
    def _get(self, key, fn):
        v = self._memo.get(key)
        if v is None:
            v = self._memo[key] = fn()
        return v

    # ----- GPU -----------------------------------------------------------------------------------
    def pre(self, block: int, tokens: int) -> float:
        """QKV projections of ``block`` for ``tokens`` tokens on the GPU."""
        def f():
            p = self.pre_params
            return self.pred.roofline(2.0 * p * tokens, p * self.bpp + 2.0 * tokens * self.hidden_bytes,
                                      self.k_pre).time_s
        return self._get(("pre", block, tokens), f)

    def post(self, block: int, tokens: int) -> float:
        """Everything of ``block`` after the attention core but the routed experts, on the GPU."""
        def f():
            p = self.m.block_dense_params(block) - self.pre_params
            return self.pred.roofline(2.0 * p * tokens, p * self.bpp + 4.0 * tokens * self.hidden_bytes,
                                      self.k_post).time_s
        return self._get(("post", block, tokens), f)

    def attn_gpu(self, tokens: int, context: int) -> float:
        """Attention core on the GPU: ``tokens`` sequences, each attending to ``context`` positions."""
        return self._get(("ag", tokens, context),
                         lambda: float(self.pred.attention_core(tokens, np.array([context]))[0][0]))

    def attn_cpu(self, tokens: int, context: int) -> float:
        """Attention core on the host CPU (all cores): KV bytes over DRAM bandwidth or FLOPs over
        peak x efficiency, whichever is longer (decode attention is bound by DRAM)."""
        def f():
            cpu, m = self.hw.cpu, self.m
            peak = cpu.peak_gflops_bf16 if m.dtype in ("bf16", "fp16") else cpu.peak_gflops_fp32
            tf = tokens * m.attention_core_flops(context) / (peak * 1e9 * cpu.compute_efficiency)
            tb = tokens * context * self.kvl / (cpu.dram_bandwidth_gb_s * 1e9)
            return max(tf, tb)
        return self._get(("ac", tokens, context), f)

    def experts(self, counts: np.ndarray) -> float:
        """GPU time of the routed experts with ``counts[e]`` tokens each (one kernel group per
        expert with tokens); numpy over the experts."""
        c = counts[counts > 0]
        if c.size == 0:
            return 0.0
        t, _ = self.pred.expert_times(c, kernels=self.k_exp)
        return float(t.sum())

    def experts_expected(self, tokens: int) -> float:
        """Expected routed-expert time of ``tokens`` tokens under uniform routing (the analytic
        models' assumption): ``d = E(1 - (1 - k/E)^tokens)`` distinct experts sharing the
        ``tokens x k`` choices equally."""
        def f():
            E, k = self.E, self.K
            d = E * (1.0 - (1.0 - k / E) ** tokens)
            per = tokens * k / d
            t, _ = self.pred.expert_times(np.array([per]), kernels=self.k_exp)
            return float(d * t[0])
        return self._get(("ee", tokens), f)

    def distinct_expected(self, tokens: int) -> float:
        """Expected distinct experts of one MoE block used by ``tokens`` tokens (uniform routing)."""
        return self.E * (1.0 - (1.0 - self.K / self.E) ** tokens)

    def head(self, tokens: int) -> float:
        """Final norm, LM head and sampling for ``tokens`` sequences."""
        return self._get(("head", tokens), lambda: self.pred.head(tokens, self.k_head).time_s)

    # ----- copies ------------------------------------------------------------------------------
    def h2d(self, nbytes: float) -> float:
        """Host-to-device copy time of ``nbytes`` (0 for nothing)."""
        return self.link.duration_s(nbytes, "h2d", pinned=self.pinned) if nbytes > 0 else 0.0

    def d2h(self, nbytes: float) -> float:
        """Device-to-host copy time of ``nbytes`` (0 for nothing)."""
        return self.link.duration_s(nbytes, "d2h", pinned=self.pinned) if nbytes > 0 else 0.0

    # ----- memory ------------------------------------------------------------------------------
    def activation_bytes(self, resident_tokens: int, working_tokens: int) -> int:
        """GPU activation memory: the hidden states (and residuals) of ``resident_tokens`` tokens kept
        on the GPU between blocks, plus the working buffers of the ``working_tokens`` tokens one op
        processes (queries, attention output, norms, the routed experts' intermediate activations).
        An estimate (assumption), not a measurement."""
        return int(2 * resident_tokens * self.hidden_bytes + working_tokens * self._work_per_token)


def choices(counts) -> int:
    """Routed (token, expert) choices in ``counts`` (0 for a block without routed experts)."""
    return 0 if counts is None else int(counts.sum())


class Routing:
    """The routed experts of the rows a throughput run replays: step ``s`` of a run with ``N``
    sequences uses trace rows ``s*N .. s*N+N-1`` (the trace looped as needed), sequence ``i`` of the
    step row ``s*N + i``, as the fixed-batch replay takes consecutive rows."""

    def __init__(self, experts: np.ndarray, col_of_block: dict, num_experts: int, sequences: int, steps: int):
        T = experts.shape[0]
        rows = sequences * steps
        reps = -(-rows // T)
        x = np.asarray(experts)
        if reps > 1:
            x = np.concatenate([x] * reps, axis=0)
        self.x = x[:rows].astype(np.int64)
        self.looped = reps > 1
        self.trace_rows = T
        self.N = sequences
        self.E = num_experts
        self.col_of_block = col_of_block

    def counts(self, step: int, lo: int, hi: int, block: int) -> np.ndarray | None:
        """Tokens per expert (``[E]``) of sequences ``lo .. hi-1`` of ``step`` at ``block``; None for
        a block without routed experts."""
        col = self.col_of_block.get(block)
        if col is None:
            return None
        a = self.x[step * self.N + lo: step * self.N + hi, col, :].ravel()
        return np.bincount(a[a >= 0], minlength=self.E)


@dataclass
class Access:
    """Expert accesses of one (step, MoE block) in DESIGN 3.2's sense: one per distinct expert."""

    accesses: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0


class ThroughputContext:
    """What a throughput policy builds its schedule from: the scenario, the costs, the routing,
    and where it records its run size, memory, accesses and its own report (``info``)."""

    def __init__(self, scenario, costs: ThroughputCosts, experts: np.ndarray, col_of_block: dict, source: str):
        self.sc = scenario
        self.m, self.hw, self.wl = scenario.model, scenario.hardware, scenario.workload
        self.costs = costs
        self.source = source
        self._experts = experts
        self.col_of_block = col_of_block
        self.dag = Dag()
        self.sequences = 0
        # the configured run length, known before set_run: the policies size the KV cache for their
        # memory checks (final_context) before they fix the run
        self.steps = int(getattr(scenario.policies.execution, "decode_steps", 0))
        self.warmup_steps = 0
        self.routing: Routing | None = None
        self.memory: dict = {}
        self.info: dict = {}
        self.notes: list = []
        self.access: dict = {}

    # ----- run size --------------------------------------------------------------------------------
    def set_run(self, sequences: int, steps: int, warmup_steps: int) -> None:
        """Fix the run: ``sequences`` decoding together for ``steps`` decode steps, the first
        ``warmup_steps`` left out of the metrics."""
        self.sequences, self.steps, self.warmup_steps = int(sequences), int(steps), int(warmup_steps)
        T = self._experts.shape[0]
        if sequences * steps > T and not self.wl.loop_trace:
            # every step needs all its sequences' rows, so the run cannot stop at the trace's end
            raise InputError(f"false, but this run needs {sequences * steps} trace rows ({sequences} sequences x "
                             f"{steps} steps) and the trace has {T}; set workload.loop_trace: true to reuse it",
                             source=self.source, field="workload.loop_trace")
        self.routing = Routing(self._experts, self.col_of_block, self.m.num_experts, self.sequences, self.steps)
        if self.routing.looped:
            self.notes.append(f"trace of {self.routing.trace_rows} rows looped to {sequences * steps} rows "
                              f"({sequences} sequences x {steps} steps)")

    def counts(self, step: int, lo: int, hi: int, block: int):
        """Tokens per expert of sequences ``lo .. hi-1`` of ``step`` at ``block`` (None: no experts)."""
        return self.routing.counts(step, lo, hi, block)

    def context(self, step: int) -> int:
        """KV positions one sequence attends to at ``step`` (its context plus the tokens so far)."""
        return self.wl.context_tokens + step + 1

    @property
    def final_context(self) -> int:
        """KV positions per sequence at the end of the run (sizes the KV cache)."""
        return self.wl.context_tokens + self.steps

    # ----- accounting ---------------------------------------------------------------------------------
    def record(self, step: int, block: int, **kw) -> None:
        """Expert accesses of ``(step, block)`` (fields of :class:`Access`)."""
        self.access[(step, block)] = Access(**kw)

    # ----- memory -----------------------------------------------------------------------------------
    @property
    def gpu_usable(self) -> int:
        """GPU memory a run may use (bytes): HBM minus the reserved part."""
        g = self.hw.gpu
        return int((g.hbm_gib - g.reserved_gib) * GIB)

    @property
    def host_capacity(self) -> int:
        """Host DRAM (bytes)."""
        return int(self.hw.host_memory.capacity_gib * GIB)

    def check_memory(self, gpu: dict, host: dict, *, field: str) -> dict:
        """Check that the ``gpu`` and ``host`` parts (name -> bytes) fit; an InputError naming the
        numbers (and ``field``, what to change) when not. Returns the memory report."""
        for where, parts, cap, what in (
            ("GPU", gpu, self.gpu_usable, f"{self.hw.gpu.hbm_gib:g} GiB HBM - {self.hw.gpu.reserved_gib:g} GiB reserved"),
            ("host", host, self.host_capacity, "hardware.host_memory.capacity_gib"),
        ):
            need = sum(parts.values())
            if need > cap:
                listed = " + ".join(f"{k} {v / GIB:.2f} GiB" for k, v in parts.items())
                raise InputError(f"does not fit in {where} memory: {listed} = {need / GIB:.2f} GiB > "
                                 f"{cap / GIB:.2f} GiB usable ({what})", source=self.source, field=field)
        self.memory = {
            "gpu_usable_bytes": self.gpu_usable,
            "gpu_used_bytes": int(sum(gpu.values())),
            "gpu": {k: int(v) for k, v in gpu.items()},
            "host_capacity_bytes": self.host_capacity,
            "host_used_bytes": int(sum(host.values())),
            "host": {k: int(v) for k, v in host.items()},
        }
        return self.memory

    @staticmethod
    def fits(gpu: dict, host: dict, gpu_cap: int, host_cap: int) -> bool:
        """Whether the parts fit (no error; for searches)."""
        return sum(gpu.values()) <= gpu_cap and sum(host.values()) <= host_cap


# ----- the engine ------------------------------------------------------------------------------------------
class ThroughputEngine:
    """Runs a :class:`Dag` with one SimPy process per resource (module docstring)."""

    def __init__(self, dag: Dag, *, steps: int, warmup_steps: int, sequences: int, num_blocks: int,
                 record_timeline: bool = False):
        self.dag = dag
        self.steps = steps
        self.warmup_steps = warmup_steps
        self.sequences = sequences
        self.num_blocks = num_blocks
        self.record = record_timeline
        self.start: np.ndarray | None = None
        self.end: np.ndarray | None = None

    def run(self) -> EngineResult:
        """Simulate the schedule; returns the raw result (see :mod:`moesim.metrics.throughput_summary`)."""
        d = self.dag
        n = len(d)
        env = simpy.Environment()
        done = [env.event() for _ in range(n)]
        start = np.zeros(n)
        end = np.zeros(n)
        by_res = {r: [] for r in RESOURCES}
        for i, r in enumerate(d.res):
            by_res[r].append(i)
        waits = [0]

        def stream(ids):
            for i in ids:
                for j in d.deps[i]:
                    ev = done[j]
                    if not ev.processed:
                        waits[0] += 1
                        yield ev
                start[i] = env.now
                if d.dur[i] > 0:
                    yield env.timeout(d.dur[i])
                end[i] = env.now
                done[i].succeed()

        for r in RESOURCES:
            if by_res[r]:
                env.process(stream(by_res[r]))
        env.run()
        if n and not all(ev.processed for ev in done):  # pragma: no cover - cannot happen (module docstring)
            raise RuntimeError("throughput schedule did not finish (a dependency cycle)")
        self.start, self.end = start, end
        timeouts = sum(1 for x in d.dur if x > 0)
        procs = len([r for r in RESOURCES if by_res[r]])
        # SimPy processes one completion per op, one timeout per timed op, and for every resource
        # process its start (Initialize) and its own end event
        return self._result(start, end, events=n + timeouts + 2 * procs)

    # ----- results ---------------------------------------------------------------------------------------
    def _result(self, start, end, *, events: int) -> EngineResult:
        d = self.dag
        S, W = self.steps, self.warmup_steps
        steps = np.asarray(d.step)
        step_end = np.zeros(S)
        np.maximum.at(step_end, steps, end)
        step_end = np.maximum.accumulate(step_end)
        t0 = float(step_end[W - 1]) if W else 0.0
        t1 = float(step_end[-1])
        # busy time of each resource inside the measured window
        busy = {}
        for r in RESOURCES:
            idx = [i for i, x in enumerate(d.res) if x == r]
            if not idx:
                continue
            s_, e_ = start[idx], end[idx]
            busy[r] = float(np.clip(np.minimum(e_, t1) - np.maximum(s_, t0), 0.0, None).sum())
        parts = self._critical_path(start, end, step_end)
        measured = steps >= W
        counters = _counters(d, measured)
        tl = []
        if self.record:
            for i in range(len(d)):
                tl.append((d.res[i], d.kind[i], float(start[i]), float(end[i]), d.step[i], d.layer[i], d.expert[i],
                           d.nbytes[i]))
        return EngineResult(
            steps=S,
            warmup_steps=W,
            batch_size=self.sequences,
            step_end_s=step_end,
            step_parts_s=parts,
            busy_s=busy,
            counters=counters,
            per_column={},
            events=int(events),
            timeline=tl,
            measure_start_s=t0,
        )

    def _critical_path(self, start, end, step_end) -> np.ndarray:
        """``[steps, len(TP_CP_KEYS)]`` seconds: the GPU timeline's ops and gaps, each gap charged to
        the dependency that released the op after it, split at the step boundaries."""
        d = self.dag
        key = {k: i for i, k in enumerate(TP_CP_KEYS)}
        intervals = []  # (t0, t1, cause index), in time order
        before = [-1] * len(d)  # the previous op on the same resource (an in-order stream)
        last_on: dict = {}
        for i, r in enumerate(d.res):
            before[i] = last_on.get(r, -1)
            last_on[r] = i

        def blame(j, lo, hi):
            # [lo, hi) ends when op j ends: charge j's own run to its resource, and the time before
            # it started to whatever held it back (the last of its dependencies and its resource's
            # previous op to finish), walking back until lo (a CPU attention behind the copy that
            # brings its output back is charged to the CPU, not to the copy)
            out = []
            t, cur = hi, j
            while t > lo:
                a = max(lo, float(start[cur]))
                if t > a:
                    cause = _CAUSE[d.res[cur]]
                    out.append((a, t, key["idle" if cause == "gpu_compute" else cause]))
                t = a
                if t <= lo:
                    break
                nxt, best = -1, -math.inf
                for k in d.deps[cur] + ((before[cur],) if before[cur] >= 0 else ()):
                    if end[k] > best:
                        nxt, best = k, float(end[k])
                if nxt < 0 or best <= lo:  # pragma: no cover - an op starts when its blocker ends
                    out.append((lo, t, key["idle"]))
                    break
                if best < t:  # pragma: no cover - float edge
                    out.append((best, t, key["idle"]))
                    t = best
                cur = nxt
            intervals.extend(reversed(out))

        prev = 0.0
        for i, r in enumerate(d.res):
            if r != GPU:
                continue
            s = start[i]
            if s > prev:
                j = max(d.deps[i], key=lambda k: end[k], default=-1)
                if j < 0 or end[j] <= prev:  # pragma: no cover - an in-order stream's own op
                    intervals.append((prev, s, key["idle"]))
                else:
                    blame(j, prev, s)
            if end[i] > s:
                intervals.append((s, end[i], key["gpu_compute"]))
            prev = max(prev, end[i])
        total = float(step_end[-1]) if len(step_end) else 0.0
        if total > prev:
            blame(int(np.argmax(end)), prev, total)
        out = np.zeros((len(step_end), len(TP_CP_KEYS)))
        bounds = np.concatenate([[0.0], step_end])
        k = 0
        for a, b, c in intervals:
            while a < b:
                while k < len(step_end) - 1 and a >= bounds[k + 1]:
                    k += 1
                hi = min(b, bounds[k + 1]) if k < len(step_end) - 1 else b
                if hi <= a:  # pragma: no cover - float edge
                    hi = b
                out[k, c] += hi - a
                a = hi
        return out


def _counters(d: Dag, measured: np.ndarray) -> dict:
    """Bytes, copies and tokens by op kind over the measured steps; tokens and expert choices per
    (kind, block)."""
    by_kind_bytes: dict = {H2D: {}, D2H: {}}
    tokens_kind_block: dict = {}
    choices_block: dict = {}
    copies = {H2D: 0, D2H: 0}
    bytes_dir = {H2D: 0, D2H: 0}
    ops_by_kind: dict = {}
    for i in range(len(d)):
        if not measured[i]:
            continue
        k, r = d.kind[i], d.res[i]
        ops_by_kind[k] = ops_by_kind.get(k, 0) + 1
        if r in copies:
            copies[r] += 1
            bytes_dir[r] += d.nbytes[i]
            by_kind_bytes[r][k] = by_kind_bytes[r].get(k, 0) + d.nbytes[i]
        if d.tokens[i]:
            key = (k, d.layer[i])
            tokens_kind_block[key] = tokens_kind_block.get(key, 0) + d.tokens[i]
        if d.choices[i]:
            choices_block[d.layer[i]] = choices_block.get(d.layer[i], 0) + d.choices[i]
    return {
        "bytes_h2d": bytes_dir[H2D],
        "bytes_d2h": bytes_dir[D2H],
        "copies_h2d": copies[H2D],
        "copies_d2h": copies[D2H],
        "h2d_bytes_by_kind": by_kind_bytes[H2D],
        "d2h_bytes_by_kind": by_kind_bytes[D2H],
        "ops_by_kind": ops_by_kind,
        "tokens": tokens_kind_block,
        "expert_choices": choices_block,
    }


# ----- preparing a run ---------------------------------------------------------------------------------------
@dataclass
class ThroughputPrepared:
    """Everything a throughput run needs, built and checked before it starts (the counterpart of
    :class:`moesim.engine.build.Prepared`)."""

    scenario: object
    trace: object
    trace_sha256: str | None
    model_layers: list
    col_src: list
    engine: ThroughputEngine
    predictor: Predictor
    memory: dict
    routing_note: str
    notes: list
    ctx: ThroughputContext
    policy: object
    serving: object = None
    extra: dict = field(default_factory=dict)


def is_throughput(scenario) -> bool:
    """Whether ``scenario`` runs in the throughput engine (its execution policy is a throughput
    system: MoE-Lightning, Klotski, MoE-Gen)."""
    from moesim.policies.base import registry

    ex = getattr(scenario.policies, "execution", None)
    cls = registry("execution").get(ex.kind) if ex is not None else None
    return bool(getattr(cls, "throughput_engine", False))


def prepare_throughput(scenario, *, source: str = "scenario", record_timeline: bool = False) -> ThroughputPrepared:
    """Build and check a throughput run of ``scenario``; raises InputError on bad input."""
    from types import SimpleNamespace

    from moesim.engine.build import apply_routing, load_routing, map_columns, routing_note
    from moesim.policies.base import registry
    from moesim.traces import check_trace_against_model

    sc = scenario
    m = sc.model
    kind = sc.policies.execution.kind
    if getattr(sc, "cluster", None) is not None:
        raise InputError(f"{kind} models one GPU; remove the cluster: block", source=source, field="cluster")
    if sc.workload.requests is not None:
        raise InputError(f"{kind} decodes a fixed set of sequences (offline batch inference); request "
                         "arrivals (workload.requests) are not modelled with it", source=source,
                         field="workload.requests")
    if sc.policies.cache.kind != "streaming":
        raise InputError(f"{kind} manages the GPU's weights itself (streamed per block); set "
                         "policies.cache.kind: streaming", source=source, field="policies.cache.kind")
    for fam, none in (("prefetch", "none"), ("precision", "full")):
        if getattr(sc.policies, fam).kind != none:
            raise InputError(f"{kind} schedules its own copies; policies.{fam}.kind must be {none!r}",
                             source=source, field=f"policies.{fam}.kind")
    if not sc.runtime.wait_for_router:
        raise InputError(f"{kind} reads each router output before it moves tokens", source=source,
                         field="runtime.wait_for_router")
    trace, sha = load_routing(sc, source)
    trace_layers = check_trace_against_model(trace, num_experts=m.num_experts, moe_layers=m.moe_layers,
                                             layers=sc.trace.layers, source=sc.trace.path or source)
    trace_layers = tuple(int(x) for x in trace_layers)
    routed = apply_routing(sc, trace, source)
    if routed is not None:
        trace = routed[0]
    model_layers, col_src, borrowed = map_columns(m, trace_layers)
    costs = ThroughputCosts(m, sc.hardware, sc.runtime)
    ctx = ThroughputContext(sc, costs, np.asarray(trace.experts), dict(zip(model_layers, col_src)), source)
    cfg = sc.policies.execution
    policy = registry("execution")[kind](cfg, None)
    policy.build(ctx)
    engine = ThroughputEngine(ctx.dag, steps=ctx.steps, warmup_steps=ctx.warmup_steps, sequences=ctx.sequences,
                              num_blocks=m.num_layers, record_timeline=record_timeline)
    note = routing_note(sc, trace, trace_layers, borrowed, SimpleNamespace(notes=list(ctx.notes)))
    return ThroughputPrepared(scenario=sc, trace=trace, trace_sha256=sha, model_layers=list(model_layers),
                              col_src=list(col_src), engine=engine, predictor=costs.pred, memory=ctx.memory,
                              routing_note=note, notes=list(ctx.notes), ctx=ctx, policy=policy)
