"""Klotski: an expert-aware multi-batch pipeline; several batches share each block's loaded weights."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from moesim.engine.throughput import GPU, H2D
from moesim.errors import InputError
from moesim.policies.execution.throughput_base import LayerBuffers, ThroughputConfig, ThroughputExecution


class Klotski(ThroughputExecution):
    """Klotski (Fang, Huang et al., ASPLOS 2025, arXiv:2502.06888, "Efficient Mixture-of-Expert
    Inference via Expert-Aware Multi-Batch Pipeline"): with the weights offloaded, one batch's
    compute on a block is shorter than loading the next block, so the pipeline has bubbles. Klotski
    runs ``n`` batches through each block while it is loaded — their attention one after another,
    then each activated expert once for the tokens of every batch that routed to it — so the compute
    of ``n`` batches hides the next block's I/O and each weight byte serves ``n`` times as many
    tokens. More batches activate more distinct experts (the union of their routing), so it orders
    the experts hot first (most tokens first, so compute starts early while colder ones still
    load) and prefetches the next block's hot experts before its router has run.

    What moesim models, per (step, block): the block's dense weights (attention, router, shared
    experts) copied one block ahead into a GPU buffer (``weight_buffers`` of them); ``attention``
    of each batch on the GPU (KV cache resident in GPU memory); the union of the batches' routed
    experts from the trace, each copied once (``expert_load``, issued after the batches' routers,
    in ``order``) unless prefetched, and computed once for all its tokens (``expert``); after them,
    the next block's dense weights and its ``prefetch_hot`` predicted-hot experts
    (``expert_prefetch``). The prediction is the block's most used experts over the steps already
    run (causal); wrong guesses are copied for nothing and counted wasted. ``batches: auto`` is a
    stand-in for Klotski's constraint-sensitive planner: the fewest batches whose estimated
    compute per block covers the block's estimated I/O (uniform routing), else the most that fit.

    What the paper leaves open or moesim chooses: the predictor (per-block frequency here instead
    of Klotski's inter-layer correlation), the planner's objective, KV on the GPU (the memory check
    is that ``n`` batches' KV and activations fit next to the buffers), one fused kernel per expert
    over all batches' tokens."""

    class Config(ThroughputConfig):
        """``batches`` batches of ``workload.batch_size`` sequences share each loaded block."""

        kind: Literal["klotski"] = "klotski"
        batches: int | Literal["auto"] = Field(default="auto", description="batches sharing each block; auto: the planner")
        max_batches: int = Field(default=32, ge=1, description="auto: most batches considered")
        prefetch_hot: int = Field(default=2, ge=0, description="next block's predicted-hot experts prefetched")
        order: Literal["hot_first", "by_id"] = Field(default="hot_first", description="expert load/compute order")
        weight_buffers: int = Field(default=2, ge=2, description="GPU block buffers (dense weights + experts)")

    # ----- memory and the planner --------------------------------------------------------------------------
    def memory(self, ctx, n: int) -> tuple[dict, dict]:
        """GPU and host memory (name -> bytes) with ``n`` batches."""
        c = ctx.costs
        b = ctx.wl.batch_size
        gpu = {"embedding_and_head": c.resident_w,
               "weight_buffers": self.config.weight_buffers * max(c.block_w),
               "kv_cache": n * b * ctx.final_context * c.kv_token,
               "activations": c.activation_bytes(n * b, n * b)}
        host = {"weights": sum(c.block_w)}
        return gpu, host

    def estimate(self, ctx, n: int) -> tuple[float, float]:
        """(compute, I/O) seconds of one MoE block with ``n`` batches (uniform routing, mean context)."""
        c = ctx.costs
        b = ctx.wl.batch_size
        blk = min(c.moe_blocks)
        ctxlen = int(ctx.wl.context_tokens + (self.config.decode_steps + 1) / 2)
        comp = n * (c.pre(blk, b) + c.attn_gpu(b, ctxlen) + c.post(blk, b)) + c.experts_expected(n * b)
        io = c.h2d(c.dense_w[blk]) + c.distinct_expected(n * b) * c.h2d(c.expert_bytes)
        return comp, io

    def plan_batches(self, ctx) -> tuple[int, str]:
        """The number of batches and why (see the class docstring)."""
        cfg = self.config
        if cfg.batches != "auto":
            return int(cfg.batches), "fixed"
        feasible = [n for n in range(1, cfg.max_batches + 1)
                    if ctx.fits(*self.memory(ctx, n), ctx.gpu_usable, ctx.host_capacity)]
        if not feasible:
            return 1, "fixed"  # the memory check reports why
        for n in feasible:
            comp, io = self.estimate(ctx, n)
            if comp >= io:
                return n, "compute covers I/O"
        return feasible[-1], "memory limit"

    # ----- the schedule ---------------------------------------------------------------------------------------
    def build(self, ctx) -> None:
        cfg = self.config
        n, why = self.plan_batches(ctx)
        if n < 1:  # pragma: no cover - validated
            raise InputError("needs at least one batch", source=ctx.source, field="policies.execution.batches")
        gpu, host = self.memory(ctx, n)
        ctx.check_memory(gpu, host, field="policies.execution.batches")
        ctx.set_run(n * ctx.wl.batch_size, cfg.decode_steps, cfg.warmup_steps)
        self._schedule(ctx, n)
        comp, io = self.estimate(ctx, n)
        ctx.info = {"system": "klotski", "batches": n, "batch_size": ctx.wl.batch_size, "planner": why,
                    "estimated_block_compute_ms": comp * 1e3, "estimated_block_io_ms": io * 1e3,
                    "order": cfg.order, "prefetch_hot": cfg.prefetch_hot}

    def _schedule(self, ctx, n: int) -> None:
        cfg = self.config
        c, dag = ctx.costs, ctx.dag
        L, S, bsz = c.L, ctx.steps, ctx.wl.batch_size
        bufs = LayerBuffers(cfg.weight_buffers)
        history = {b: np.zeros(c.E, dtype=np.int64) for b in c.moe_blocks}
        dense_op: dict = {}  # global block -> its dense-weight copy
        prefetched: dict = {}  # global block -> {expert: copy op}
        last = [None] * n

        def issue_next(g, s_next, b_next):
            """Dense weights and predicted-hot experts of global block ``g``, queued now."""
            if g >= S * L:
                return
            dep = bufs.free_dep(g)
            dense_op[g] = ctx.dag.add(H2D, "dense_weights", c.h2d(c.dense_w[b_next]), (dep,), step=s_next,
                                      layer=b_next, nbytes=c.dense_w[b_next])
            hist = history.get(b_next)
            if hist is None or cfg.prefetch_hot == 0 or not hist.any():
                return
            order = np.lexsort((np.arange(c.E), -hist))
            hot = [int(e) for e in order[:cfg.prefetch_hot] if hist[e] > 0]
            prefetched[g] = {e: ctx.dag.add(H2D, "expert_prefetch", c.h2d(c.expert_bytes), (dep,), step=s_next,
                                            layer=b_next, expert=e, nbytes=c.expert_bytes) for e in hot}

        issue_next(0, 0, 0)
        for s in range(S):
            ctxlen = ctx.context(s)
            for b in range(L):
                g = s * L + b
                attn = []
                for j in range(n):
                    t = c.pre(b, bsz) + c.attn_gpu(bsz, ctxlen) + c.post(b, bsz)
                    attn.append(dag.add(GPU, "attention_gpu", t, (dense_op[g], last[j]), step=s, layer=b, batch=j,
                                        tokens=bsz))
                counts = [ctx.counts(s, j * bsz, (j + 1) * bsz, b) for j in range(n)]
                if counts[0] is None:  # a dense block: its FFN is part of the attention op's time
                    last = list(attn)
                    bufs.done(g, attn[-1])
                else:
                    last = self._experts(ctx, s, b, g, counts, attn, prefetched.pop(g, {}), bufs)
                    history[b] += sum(counts)
                nxt = g + 1
                issue_next(nxt, nxt // L, nxt % L)
            for j in range(n):
                last[j] = dag.add(GPU, "head", c.head(bsz), (last[j],), step=s, layer=L, batch=j, tokens=bsz)

    def _experts(self, ctx, s, b, g, counts, attn, pre, bufs) -> list:
        """Loads and kernels of the union of the batches' experts at ``(s, b)``; returns each batch's
        last op (its tokens are ready when every expert it routed to has run)."""
        c, dag = ctx.costs, ctx.dag
        n = len(counts)
        total = sum(counts)
        used = np.flatnonzero(total)
        if self.config.order == "hot_first":
            used = used[np.lexsort((used, -total[used]))]
        routed = attn[-1]  # the host knows the experts once every batch's router has run
        dep = bufs.free_dep(g)
        load = {}
        for e in used:
            e = int(e)
            if e not in pre:
                load[e] = dag.add(H2D, "expert_load", c.h2d(c.expert_bytes), (routed, dep), step=s, layer=b, expert=e,
                                  nbytes=c.expert_bytes)
        last = list(attn)
        for e in used:
            e = int(e)
            k = int(total[e])
            op = dag.add(GPU, "expert", c.experts(np.array([k])), (load.get(e, pre.get(e)), routed), step=s, layer=b,
                         expert=e, tokens=k, choices=k)
            for j in range(n):
                if counts[j][e]:
                    last[j] = op
        used_set = {int(e) for e in used}
        pf_used = len(used_set & set(pre))
        ctx.record(s, b, accesses=len(used_set), hits=pf_used, misses=len(load), loads=len(load) + len(pre),
                   prefetch_issued=len(pre), prefetch_used=pf_used, prefetch_wasted=len(pre) - pf_used)
        bufs.done(g, len(dag) - 1 if used.size else attn[-1])  # its last expert kernel
        return last
