"""MoE-Gen: module-based batching; tokens wait in host memory, each module runs one large batch."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from moesim.engine.throughput import D2H, GPU, H2D, choices
from moesim.policies.execution.throughput_base import LayerBuffers, ThroughputConfig, ThroughputExecution


class MoEGen(ThroughputExecution):
    """MoE-Gen (Xu, Xue, Lu, Jackson, Mai; 2025, arXiv:2503.09716, "High-Throughput MoE Inference
    on a Single GPU with Module-Based Batching"): model-based batching (one batch through the whole
    model, its KV cache in GPU memory) keeps batches small, because GPU memory bounds them. MoE-Gen
    keeps the hidden states and KV cache of *all* sequences in host memory and runs each module of
    a block with a batch of its own size: the attention module in batches of ``attention_batch``
    sequences (their KV copied in for it), the expert module in batches of ``expert_batch`` tokens
    (each expert then sees every token routed to it in that batch), with the block's weights
    copied once per step into a GPU double buffer while the previous block computes.

    What moesim models, per (step, block): ``block_weights`` (dense weights and all experts of the
    block) copied one block ahead; for each attention batch ``attn_in_hidden`` and ``attn_in_kv``
    (its hidden states and KV cache up), ``attn_module`` on the GPU (projections, attention core,
    router, shared experts) and ``attn_module_out`` (hidden states and the new KV down); once every
    token has been through attention (the tokens accumulate in host memory), for each expert batch
    ``expert_in``, ``experts`` (the routed experts of those tokens from the trace, one kernel group
    per expert) and ``expert_out``;
    after the last block the LM head per attention batch. Every token passes the attention module
    and each of its routed experts exactly once per block (the summary's per-layer
    ``attention_tokens`` and ``routed_tokens`` show it).

    ``module_batching: false`` is the model-based-batching baseline at the same memory: one batch
    of ``model_batch`` sequences (``auto``: the most whose KV cache fits in GPU memory next to the
    weight double buffer) runs every block on the GPU with its KV resident, the blocks' weights
    streamed as above.

    What the paper leaves open or moesim chooses: the batch sizes are configured, not searched
    (MoE-Gen optimises them); attention runs on the GPU with the KV copied in (MoE-Gen's
    CPU-attention option is not modelled); a block's weights are copied whole (at these batch sizes
    every expert is routed to); activation memory is an estimate."""

    class Config(ThroughputConfig):
        """Module-based batching over ``workload.batch_size`` sequences, or the model-based baseline."""

        kind: Literal["moe_gen"] = "moe_gen"
        module_batching: bool = Field(default=True, description="false: the model-based-batching baseline")
        attention_batch: int = Field(default=64, ge=1, description="sequences per attention-module batch")
        expert_batch: int = Field(default=4096, ge=1, description="tokens per expert-module batch")
        model_batch: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
            default="auto", description="baseline: sequences of its one batch")

    # ----- memory ----------------------------------------------------------------------------------------
    def memory(self, ctx, sequences: int) -> tuple[dict, dict]:
        """GPU and host memory (name -> bytes) of a run of ``sequences`` sequences."""
        c, cfg = ctx.costs, self.config
        fin = ctx.final_context
        gpu = {"embedding_and_head": c.resident_w, "weight_double_buffer": 2 * max(c.block_w)}
        host = {"weights": sum(c.block_w)}
        if cfg.module_batching:
            a = min(cfg.attention_batch, sequences)
            x = min(cfg.expert_batch, sequences)
            gpu["kv_staging"] = 2 * a * fin * c.kvl
            gpu["activations"] = c.activation_bytes(0, max(a, x))
            host["kv_cache"] = sequences * fin * c.kv_token
            host["hidden_states"] = 2 * sequences * c.hidden_bytes
        else:
            gpu["kv_cache"] = sequences * fin * c.kv_token
            gpu["activations"] = c.activation_bytes(sequences, sequences)
        return gpu, host

    def model_batch(self, ctx) -> int:
        """The baseline's batch: configured, or the most sequences that fit (at most workload.batch_size)."""
        mb = self.config.model_batch
        if mb != "auto":
            return int(mb)
        best = 0
        for n in range(1, ctx.wl.batch_size + 1):
            if not ctx.fits(*self.memory(ctx, n), ctx.gpu_usable, ctx.host_capacity):
                break
            best = n
        return max(best, 1)

    # ----- the schedule ----------------------------------------------------------------------------------------
    def build(self, ctx) -> None:
        cfg = self.config
        N = ctx.wl.batch_size if cfg.module_batching else self.model_batch(ctx)
        gpu, host = self.memory(ctx, N)
        ctx.check_memory(gpu, host, field="workload.batch_size" if cfg.module_batching else "policies.execution.model_batch")
        ctx.set_run(N, cfg.decode_steps, cfg.warmup_steps)
        if cfg.module_batching:
            self._module_schedule(ctx)
        else:
            self._model_schedule(ctx)
        ctx.info = {"system": "moe_gen", "module_batching": cfg.module_batching}
        if cfg.module_batching:
            ctx.info |= {"attention_batch": min(cfg.attention_batch, N), "expert_batch": min(cfg.expert_batch, N)}
        else:
            ctx.info |= {"model_batch": N}

    def _weights(self, ctx, bufs, g):
        """Copy of global block ``g``'s whole weights (None past the run's end)."""
        c = ctx.costs
        if g >= ctx.steps * c.L:
            return None
        b = g % c.L
        return ctx.dag.add(H2D, "block_weights", c.h2d(c.block_w[b]), (bufs.free_dep(g),), step=g // c.L, layer=b,
                           nbytes=c.block_w[b])

    def _record(self, ctx, s, b, N):
        cnt = ctx.counts(s, 0, N, b)
        if cnt is not None:
            used = int((cnt > 0).sum())
            ctx.record(s, b, accesses=used, hits=0, misses=used, loads=ctx.costs.E)

    def _module_schedule(self, ctx) -> None:
        cfg = self.config
        c, dag = ctx.costs, ctx.dag
        L, S, N = c.L, ctx.steps, ctx.sequences
        A, X = min(cfg.attention_batch, N), min(cfg.expert_batch, N)
        achunks = [(lo, min(lo + A, N)) for lo in range(0, N, A)]
        xchunks = [(lo, min(lo + X, N)) for lo in range(0, N, X)]
        bufs = LayerBuffers(2)
        w = {0: self._weights(ctx, bufs, 0)}
        ready = None  # the module that last wrote every token's hidden state to host memory
        kv_users: list = []
        for s in range(S):
            ctxlen = ctx.context(s)
            for b in range(L):
                g = s * L + b
                self._record(ctx, s, b, N)
                outs = []
                for j, (lo, hi) in enumerate(achunks):
                    m = hi - lo
                    hin = dag.add(H2D, "attn_in_hidden", c.h2d(m * c.hidden_bytes), (ready,), step=s, layer=b,
                                  batch=j, nbytes=m * c.hidden_bytes)
                    nb = m * ctxlen * c.kvl
                    kin = dag.add(H2D, "attn_in_kv", c.h2d(nb), (kv_users[-2] if len(kv_users) >= 2 else None,),
                                  step=s, layer=b, batch=j, nbytes=nb)
                    t = c.pre(b, m) + c.attn_gpu(m, ctxlen) + c.post(b, m)
                    op = dag.add(GPU, "attn_module", t, (hin, kin, w[g]), step=s, layer=b, batch=j, tokens=m)
                    kv_users.append(op)
                    nb = m * (c.hidden_bytes + c.kvl)
                    outs.append(dag.add(D2H, "attn_module_out", c.d2h(nb), (op,), step=s, layer=b, batch=j,
                                        nbytes=nb))
                ready = outs[-1]  # D2H is in order: the last chunk out means all are out
                last_gpu = kv_users[-1]
                if b in c.moe_blocks:
                    xouts = []
                    for j, (lo, hi) in enumerate(xchunks):
                        m = hi - lo
                        cnt = ctx.counts(s, lo, hi, b)
                        xin = dag.add(H2D, "expert_in", c.h2d(m * c.hidden_bytes), (ready,), step=s, layer=b, batch=j,
                                      nbytes=m * c.hidden_bytes)
                        last_gpu = dag.add(GPU, "experts", c.experts(cnt), (xin, w[g]), step=s, layer=b, batch=j,
                                           tokens=m, choices=choices(cnt))
                        xouts.append(dag.add(D2H, "expert_out", c.d2h(m * c.hidden_bytes), (last_gpu,), step=s,
                                             layer=b, batch=j, nbytes=m * c.hidden_bytes))
                    ready = xouts[-1]
                bufs.done(g, last_gpu)
                w[g + 1] = self._weights(ctx, bufs, g + 1)
            outs = []
            for j, (lo, hi) in enumerate(achunks):
                m = hi - lo
                hin = dag.add(H2D, "head_in", c.h2d(m * c.hidden_bytes), (ready,), step=s, layer=L, batch=j,
                              nbytes=m * c.hidden_bytes)
                op = dag.add(GPU, "head", c.head(m), (hin,), step=s, layer=L, batch=j, tokens=m)
                outs.append(dag.add(D2H, "token_out", c.d2h(4 * m), (op,), step=s, layer=L, batch=j, nbytes=4 * m))
            ready = outs[-1]

    def _model_schedule(self, ctx) -> None:
        c, dag = ctx.costs, ctx.dag
        L, S, N = c.L, ctx.steps, ctx.sequences
        bufs = LayerBuffers(2)
        w = {0: self._weights(ctx, bufs, 0)}
        last = None
        for s in range(S):
            ctxlen = ctx.context(s)
            for b in range(L):
                g = s * L + b
                self._record(ctx, s, b, N)
                cnt = ctx.counts(s, 0, N, b)
                t = c.pre(b, N) + c.attn_gpu(N, ctxlen) + c.post(b, N) + (c.experts(cnt) if cnt is not None else 0.0)
                last = dag.add(GPU, "block", t, (w[g], last), step=s, layer=b, tokens=N, choices=choices(cnt))
                bufs.done(g, last)
                w[g + 1] = self._weights(ctx, bufs, g + 1)
            last = dag.add(GPU, "head", c.head(N), (last,), step=s, layer=L, tokens=N)
