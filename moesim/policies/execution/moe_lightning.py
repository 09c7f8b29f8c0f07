"""MoE-Lightning: CPU-GPU-I/O pipelining (CGOPipe) with paged weights, policy from an HRM search."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import Field, field_validator

from moesim.engine.throughput import CPU, D2H, GPU, H2D, choices
from moesim.errors import InputError
from moesim.policies.execution.throughput_base import LayerBuffers, ThroughputConfig, ThroughputExecution

Attention = Literal["cpu", "gpu", "gpu_kv_streamed"]


@dataclass(frozen=True)
class LightningPolicy:
    """One point of MoE-Lightning's policy space: ``micro_batches`` x ``micro_batch`` sequences,
    where attention runs (``cpu``: KV cache in host memory; ``gpu``: KV cache resident in GPU
    memory; ``gpu_kv_streamed``: KV cache in host memory, each micro-batch's KV of a block copied to
    the GPU before its attention, FlexGen-style), and how many leading blocks keep their weights on
    the GPU (the rest are paged in every step)."""

    micro_batches: int
    micro_batch: int
    attention: str
    resident_layers: int

    @property
    def sequences(self) -> int:
        """N: sequences decoded together."""
        return self.micro_batches * self.micro_batch


class MoELightning(ThroughputExecution):
    """MoE-Lightning (Cao, Liu, Griggs, Schafhalter, Liu, Sheng, Gonzalez, Zaharia, Stoica;
    ASPLOS 2025, arXiv:2411.11217): high-throughput batch decoding of an MoE whose weights do not
    fit in GPU memory. Its pipeline, CGOPipe, runs the attention core on the CPU next to the KV
    cache in host memory, the rest of each block (QKV and output projections, router, experts) on
    the GPU, and pages the *next* block's weights into a GPU double buffer (2 x one block) while the
    current block computes, the pages interleaved with the micro-batches' activation transfers. A
    batch of N sequences is split into micro-batches of mu so that the GPU, the CPU and the link
    work at the same time. Its policy (N, mu, where attention runs, how much stays on the GPU) comes
    from a Hierarchical Roofline Model (HRM): each block's time is the largest of its GPU, CPU and
    link times, each a roofline at its level of the memory hierarchy.

    What moesim models: the CGOPipe schedule per (micro-batch, block) — GPU ``pre_attn``, ``qkv``
    down, CPU ``attention``, ``attn_out`` up, GPU ``post_attn_ffn`` (router and the micro-batch's
    routed experts from the trace) — with the next block's weights in ``micro_batches`` pages, one
    after each ``attn_out`` on the FIFO copy engine; and the HRM-style analytic model (uniform
    routing: expected distinct experts per micro-batch) searched over the candidate space below.
    Its optimum over the micro-batch count is found by bisection on memory: the analytic throughput
    never falls as micro-batches are added (every term of a block's time is either fixed or grows
    linearly with them), so the largest count that fits is best; tests check this against an
    exhaustive search.

    What the paper leaves open or moesim chooses (config fields): the candidate lists
    (``micro_batch_sizes``, ``max_micro_batches``, ``attention_options``, ``resident_layer_options``);
    weights kept on the GPU are whole leading blocks (the paper's weight ratio is continuous); KV
    is all on one side (the paper's cache ratio is 0 or 1 here); the FFN always runs on the GPU;
    the GPU issue order within a block is all micro-batches' ``pre_attn`` then their
    ``post_attn_ffn``; activation memory is an estimate. The paper solves its policy problem as a
    MILP; an exact search over a finite space gives the same optimum of the same model."""

    class Config(ThroughputConfig):
        """CGOPipe with an HRM policy search (``search: true``) or a fixed policy."""

        kind: Literal["moe_lightning"] = "moe_lightning"
        search: bool = Field(default=True, description="choose the policy by the HRM search; false: the fixed fields")
        micro_batch: int = Field(default=64, ge=1, description="fixed policy: sequences per micro-batch")
        micro_batches: int = Field(default=8, ge=1, description="fixed policy: micro-batches (N = micro_batches x micro_batch)")
        attention: Attention = Field(default="cpu", description="fixed policy: where the attention core runs")
        resident_layers: int = Field(default=0, ge=0, description="fixed policy: leading blocks whose weights stay on the GPU")
        micro_batch_sizes: list[int] = Field(default=[16, 32, 64, 128, 256], min_length=1)
        max_micro_batches: int = Field(default=64, ge=1, description="search: most micro-batches per batch")
        attention_options: list[Attention] = Field(default=["cpu", "gpu", "gpu_kv_streamed"], min_length=1)
        resident_layer_options: list[int] = Field(default=[0, 1, 2, 4, 8], min_length=1)

        @field_validator("micro_batch_sizes", "resident_layer_options")
        @classmethod
        def _non_negative(cls, v, info):
            low = 1 if info.field_name == "micro_batch_sizes" else 0  # a micro-batch holds a sequence
            if any(x < low for x in v):
                raise ValueError(f"entries must be >= {low}")
            return sorted(set(v))

    # ----- the analytic model (HRM) -------------------------------------------------------------------
    def memory(self, ctx, p: LightningPolicy) -> tuple[dict, dict]:
        """GPU and host memory (name -> bytes) of policy ``p``."""
        c = ctx.costs
        L = c.L
        k = min(p.resident_layers, L)
        kv_all = p.sequences * ctx.final_context * c.kv_token
        gpu = {"embedding_and_head": c.resident_w, "resident_blocks": sum(c.block_w[:k]),
               "weight_double_buffer": 2 * max(c.block_w[k:], default=0)}
        host = {"streamed_weights": sum(c.block_w[k:])}
        if p.attention == "gpu":
            gpu["kv_cache"] = kv_all
        elif p.attention == "gpu_kv_streamed":
            gpu["kv_double_buffer"] = 2 * p.micro_batch * ctx.final_context * c.kvl
            host["kv_cache"] = kv_all
        else:
            host["kv_cache"] = kv_all
        gpu["activations"] = c.activation_bytes(p.sequences, p.micro_batch)
        return gpu, host

    def fits(self, ctx, p: LightningPolicy) -> bool:
        """Whether policy ``p`` fits in GPU and host memory."""
        gpu, host = self.memory(ctx, p)
        return ctx.fits(gpu, host, ctx.gpu_usable, ctx.host_capacity)

    def hrm(self, ctx, p: LightningPolicy, context: float | None = None) -> dict:
        """HRM estimate of policy ``p``: per block the largest of link (pages + activations + KV
        in), device-to-host, GPU and CPU time, summed over blocks with the LM head; throughput in
        tokens/s and which resource bounds most blocks."""
        c = ctx.costs
        n, mu = p.micro_batches, p.micro_batch
        ctxlen = int(round(context if context is not None else ctx.wl.context_tokens + (self.config.decode_steps + 1) / 2))
        total = 0.0
        bound_count = {"link": 0, "d2h": 0, "gpu": 0, "cpu": 0}
        for b in range(c.L):
            streamed = b >= p.resident_layers
            io = n * c.h2d(c.block_w[b] / n) if streamed else 0.0
            d2h = 0.0
            gpu = n * (c.pre(b, mu) + c.post(b, mu) + (c.experts_expected(mu) if b in c.moe_blocks else 0.0))
            cpu = 0.0
            if p.attention == "cpu":
                io += n * c.h2d(mu * c.attn_out_bytes)
                d2h = n * c.d2h(mu * c.qkv_bytes)
                cpu = n * c.attn_cpu(mu, ctxlen)
            else:
                gpu += n * c.attn_gpu(mu, ctxlen)
                if p.attention == "gpu_kv_streamed":
                    io += n * c.h2d(mu * ctxlen * c.kvl)
                    d2h = n * c.d2h(mu * c.kvl)
            parts = {"link": io, "d2h": d2h, "gpu": gpu, "cpu": cpu}
            worst = max(parts, key=parts.get)
            bound_count[worst] += 1
            total += parts[worst]
        total += n * c.head(mu)
        return {"throughput_tok_s": p.sequences / total, "step_s": total,
                "bound": max(bound_count, key=bound_count.get), "blocks_bound_by": bound_count}

    def candidates(self, ctx):
        """The (micro_batch, attention, resident_layers) triples of the search space."""
        cfg = self.config
        ks = [k for k in cfg.resident_layer_options if k <= ctx.costs.L]
        return [(mu, a, k) for mu in cfg.micro_batch_sizes for a in cfg.attention_options for k in ks]

    def search(self, ctx) -> tuple[LightningPolicy | None, dict | None, int]:
        """The best policy under the HRM: for each triple the largest micro-batch count that fits
        (bisection: memory grows with it, the HRM throughput never falls), then the best triple
        (ties: the earlier triple). Returns (policy, its estimate, estimates made)."""
        best = best_est = None
        evals = 0
        nmax = self.config.max_micro_batches
        for mu, a, k in self.candidates(ctx):
            if not self.fits(ctx, LightningPolicy(1, mu, a, k)):
                continue
            lo, hi = 1, nmax  # lo fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.fits(ctx, LightningPolicy(mid, mu, a, k)):
                    lo = mid
                else:
                    hi = mid - 1
            p = LightningPolicy(lo, mu, a, k)
            est = self.hrm(ctx, p)
            evals += 1
            if best_est is None or est["throughput_tok_s"] > best_est["throughput_tok_s"]:
                best, best_est = p, est
        return best, best_est, evals

    def exhaustive(self, ctx) -> tuple[LightningPolicy | None, dict | None]:
        """Every feasible point of the space estimated (the reference the search is tested against)."""
        best = best_est = None
        for mu, a, k in self.candidates(ctx):
            for n in range(1, self.config.max_micro_batches + 1):
                p = LightningPolicy(n, mu, a, k)
                if not self.fits(ctx, p):
                    continue
                est = self.hrm(ctx, p)
                if best_est is None or est["throughput_tok_s"] > best_est["throughput_tok_s"]:
                    best, best_est = p, est
        return best, best_est

    # ----- the schedule ------------------------------------------------------------------------------------
    def build(self, ctx) -> None:
        cfg = self.config
        evals = 0
        if cfg.search:
            p, est, evals = self.search(ctx)
            if p is None:
                mu = min(cfg.micro_batch_sizes)
                gpu, host = self.memory(ctx, LightningPolicy(1, mu, cfg.attention_options[0], 0))
                ctx.check_memory(gpu, host, field="policies.execution.micro_batch_sizes")  # raises
                raise InputError("no policy of the search space fits in memory", source=ctx.source,  # pragma: no cover
                                 field="policies.execution")
        else:
            p = LightningPolicy(cfg.micro_batches, cfg.micro_batch, cfg.attention, cfg.resident_layers)
            if p.resident_layers > ctx.costs.L:
                raise InputError(f"{p.resident_layers} exceeds the model's {ctx.costs.L} blocks", source=ctx.source,
                                 field="policies.execution.resident_layers")
            est = None
        gpu, host = self.memory(ctx, p)
        ctx.check_memory(gpu, host, field="policies.execution.micro_batches")
        if est is None:
            est = self.hrm(ctx, p)
        ctx.set_run(p.sequences, cfg.decode_steps, cfg.warmup_steps)
        self._schedule(ctx, p)
        ctx.info = {
            "system": "moe_lightning",
            "policy": asdict(p) | {"sequences": p.sequences},
            "hrm": {"searched": cfg.search, "estimates": evals, **est},
        }

    def _schedule(self, ctx, p: LightningPolicy) -> None:
        c, dag = ctx.costs, ctx.dag
        L, n, mu = c.L, p.micro_batches, p.micro_batch
        S = ctx.steps
        bufs = LayerBuffers(2)
        pages: dict = {}  # global block -> ids of its page copies
        last = [None] * n  # last GPU op of each micro-batch (its hidden state is ready)
        kv_users: list = []  # GPU ops reading a KV double buffer slot (gpu_kv_streamed)

        def streamed(g):
            return g < S * L and (g % L) >= p.resident_layers

        def page(g, j):
            if not streamed(g):
                return
            w = c.block_w[g % L]
            size = w // n + (1 if j < w % n else 0)
            pages.setdefault(g, []).append(
                dag.add(H2D, "weight_page", c.h2d(size), (bufs.free_dep(g),), step=g // L, layer=g % L, batch=j,
                        nbytes=size))

        for j in range(n):  # the first block's pages before anything runs
            page(0, j)
        for s in range(S):
            ctxlen = ctx.context(s)
            for b in range(L):
                g = s * L + b
                w_ready = pages[g][-1] if streamed(g) else None
                counts = [ctx.counts(s, j * mu, (j + 1) * mu, b) for j in range(n)]
                self._record(ctx, s, b, counts, resident=not streamed(g))
                if p.attention == "cpu":
                    qkv = []
                    for j in range(n):
                        pre = dag.add(GPU, "pre_attn", c.pre(b, mu), (w_ready, last[j]), step=s, layer=b, batch=j,
                                      tokens=mu)
                        qkv.append(dag.add(D2H, "qkv", c.d2h(mu * c.qkv_bytes), (pre,), step=s, layer=b, batch=j,
                                           nbytes=mu * c.qkv_bytes))
                    for j in range(n):
                        at = dag.add(CPU, "attention", c.attn_cpu(mu, ctxlen), (qkv[j],), step=s, layer=b, batch=j,
                                     tokens=mu)
                        out = dag.add(H2D, "attn_out", c.h2d(mu * c.attn_out_bytes), (at,), step=s, layer=b, batch=j,
                                      nbytes=mu * c.attn_out_bytes)
                        page(g + 1, j)
                        t = c.post(b, mu) + (c.experts(counts[j]) if counts[j] is not None else 0.0)
                        last[j] = dag.add(GPU, "post_attn_ffn", t, (out, w_ready), step=s, layer=b, batch=j,
                                          tokens=mu, choices=choices(counts[j]))
                else:
                    for j in range(n):
                        kin = None
                        if p.attention == "gpu_kv_streamed":
                            nb = mu * ctxlen * c.kvl
                            kin = dag.add(H2D, "kv_in", c.h2d(nb), (kv_users[-2] if len(kv_users) >= 2 else None,),
                                          step=s, layer=b, batch=j, nbytes=nb)
                        t = c.pre(b, mu) + c.attn_gpu(mu, ctxlen) + c.post(b, mu)
                        t += c.experts(counts[j]) if counts[j] is not None else 0.0
                        last[j] = dag.add(GPU, "block", t, (w_ready, last[j], kin), step=s, layer=b, batch=j,
                                          tokens=mu, choices=choices(counts[j]))
                        if kin is not None:
                            kv_users.append(last[j])
                            dag.add(D2H, "kv_out", c.d2h(mu * c.kvl), (last[j],), step=s, layer=b, batch=j,
                                    nbytes=mu * c.kvl)
                        page(g + 1, j)
                bufs.done(g, last[n - 1])
            for j in range(n):
                last[j] = dag.add(GPU, "head", c.head(mu), (last[j],), step=s, layer=L, batch=j, tokens=mu)

    @staticmethod
    def _record(ctx, s, b, counts, *, resident: bool) -> None:
        if counts[0] is None:
            return
        used = int((sum(counts) > 0).sum())
        E = ctx.costs.E
        ctx.record(s, b, accesses=used, hits=used if resident else 0, misses=0 if resident else used,
                   loads=0 if resident else E)
