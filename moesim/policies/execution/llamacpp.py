"""llama.cpp-style static CPU/GPU layout: experts not in GPU memory are computed on the CPU, and
whole transformer blocks can stay on the CPU (``-ngl``) or expert tensors be placed by pattern
(``-ot``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal

from pydantic import Field, field_validator, model_serializer

from moesim.errors import InputError
from moesim.policies.execution.base import ExecutionPolicy
from moesim.policies.execution.cpu_options import CpuExecConfig

#: buffer types a ``-ot`` override may name on moesim's one-GPU machine (llama.cpp lists the
#: default buffer type of every device: the CPU backend's ``CPU`` and the first CUDA device's ``CUDA0``)
BUFFER_TYPES = ("CPU", "CUDA0")
OT_FIELD = "policies.execution.override_tensors"
NGL_FIELD = "policies.execution.n_gpu_layers"


def parse_overrides(entries) -> list[tuple[str, re.Pattern, str]]:
    """``[(pattern, compiled regex, buffer type)]`` from ``-ot`` values (each ``REGEX=BUFTYPE``;
    one value may hold several, comma-separated, as llama.cpp splits them); ValueError naming the
    bad part otherwise."""
    out = []
    for entry in entries:
        for part in str(entry).split(","):
            pos = part.find("=")
            if pos < 0:
                raise ValueError(f"{part!r} is not REGEX=BUFFER_TYPE")
            pat, buft = part[:pos], part[pos + 1:]
            if buft not in BUFFER_TYPES:
                raise ValueError(f"unknown buffer type {buft!r} in {part!r} (expected one of {', '.join(BUFFER_TYPES)})")
            try:
                rx = re.compile(pat)
            except re.error as exc:
                raise ValueError(f"bad regular expression {pat!r}: {exc}") from None
            out.append((pat, rx, buft))
    return out


def block_tensors(model, block: int) -> list[tuple[str, str]]:
    """GGUF tensor names of transformer block ``block`` (llama.cpp's ``blk.{i}.*`` naming) and the
    role of each: ``attn``, ``norm``, ``router``, ``exps`` (routed experts), ``shexp`` (shared
    experts) or ``ffn`` (a dense block's FFN). Norm and bias tensors a family adds (e.g. Qwen3's
    q/k norms) are left out: they would be matched like the attention tensors around them."""
    p = f"blk.{block}."
    a = model.attention
    names = [("attn_norm", "norm")]
    if a.kind == "mla":
        q = ["attn_q"] if a.q_lora_rank is None else ["attn_q_a", "attn_q_a_norm", "attn_q_b"]
        names += [(n, "attn") for n in q + ["attn_kv_a_mqa", "attn_kv_a_norm", "attn_kv_b", "attn_output"]]
    else:
        names += [(n, "attn") for n in ("attn_q", "attn_k", "attn_v", "attn_output")]
    names.append(("ffn_norm", "norm"))
    mats = ("gate", "up", "down") if model.ffn_gated else ("up", "down")
    if block in set(model.moe_layers):
        names.append(("ffn_gate_inp", "router"))
        names += [(f"ffn_{m}_exps", "exps") for m in mats]
        if model.num_shared_experts:
            names += [(f"ffn_{m}_shexp", "shexp") for m in mats]
    else:
        names += [(f"ffn_{m}", "ffn") for m in mats]
    return [(p + n + ".weight", role) for n, role in names]


@dataclass(frozen=True)
class LayerOffloadTimes:
    """CPU-side times of a whole-layer offload (seconds), read by the single-GPU engine.

    Per MoE column ``c`` (the stage of its dense blocks since the previous MoE layer):
    ``cpu_blocks[c]`` blocks of the stage run on the CPU (they come first in the stage),
    ``cpu_base[c]`` is their time without the attention core, ``moe_on_cpu[c]`` whether the MoE
    block itself is on the CPU (its router output is then on the host, its experts are CPU
    experts that need no activation copies). ``attn[s]``: attention core of one CPU block at step ``s`` (its KV
    cache in host memory). The tail: ``tail_cpu_blocks`` leading trailing blocks on the CPU
    (``tail_cpu_base`` seconds plus their attention), ``head_cpu`` the output layer's CPU time,
    or None when it runs on the GPU. ``start_on_host``: block 0 runs on the CPU (where the token
    embedding is looked up, so no copy before it)."""

    cpu_blocks: list
    cpu_base: list
    moe_on_cpu: list
    attn: list
    tail_cpu_blocks: int
    tail_cpu_base: float
    head_cpu: float | None
    start_on_host: bool


@dataclass(frozen=True)
class LlamaCppLayout:
    """Where llama.cpp puts each tensor: blocks ``0 .. gpu_from - 1`` (all their tensors, KV cache
    included) on the CPU, the rest on the GPU; the output layer on the GPU when ``head_on_gpu``;
    the routed experts of ``host_expert_layers`` (model block indices) in host memory."""

    num_layers: int
    n_gpu_layers: int | None
    order: str
    gpu_from: int
    head_on_gpu: bool
    host_expert_layers: tuple
    host_expert_columns: frozenset
    moe_layers: tuple = field(default=())

    @property
    def partial(self) -> bool:
        """Whether any block or the output layer stays on the CPU (not the all-GPU layout)."""
        return self.gpu_from > 0 or not self.head_on_gpu

    def block_on_gpu(self, block: int) -> bool:
        """Whether transformer block ``block`` runs on the GPU."""
        return block >= self.gpu_from

    def boundaries(self) -> int:
        """Places per step where the hidden state crosses the link because one block (or the
        output layer) runs on the other device than the one before it. The copies around CPU
        experts of GPU blocks (``--n-cpu-moe`` / ``-ot``) are not counted here, nor the token
        embedding (looked up on the CPU, taken as already where block 0 runs)."""
        devs = [self.block_on_gpu(b) for b in range(self.num_layers)] + [self.head_on_gpu]
        return sum(1 for a, b in pairwise(devs) if a != b)

    def offloaded(self) -> str:
        """llama.cpp's own summary line of the split."""
        on = (self.num_layers - self.gpu_from) + (1 if self.head_on_gpu else 0)
        return f"offloaded {on}/{self.num_layers + 1} layers to GPU"

    def host_dense_bytes(self, model) -> int:
        """Non-expert weight bytes that stay in host memory (CPU blocks, and the LM head and final
        norm when the output layer is on the CPU)."""
        b = sum(model.block_dense_params(i) for i in range(self.gpu_from)) * model.bytes_per_param
        if not self.head_on_gpu:
            b += model.vocab_size * model.hidden_size * model.embedding_bytes_per_param
        return round(b)

    def gpu_blocks(self) -> int:
        """Transformer blocks on the GPU (whose KV cache is in GPU memory)."""
        return self.num_layers - self.gpu_from

    def stage_times(self, stages, scenario, predictor, model_layers: list, steps: int) -> None:
        """Split the precomputed stage times of ``stages`` (a StageTimes) into the GPU part (the
        GPU blocks only, in place) and the CPU part (``stages.offload``): CPU-roofline times of
        the CPU blocks (weights and KV bytes over DRAM bandwidth, FLOPs over the CPU's peak)."""
        m, rt, wl = scenario.model, scenario.runtime, scenario.workload
        B = wl.batch_size
        eager = rt.launch_mode == "eager"
        dk = rt.dense_kernels_per_layer if eager else 1
        g = self.gpu_from
        stages_blocks, prev = [], -1
        for lay in model_layers:
            stages_blocks.append(list(range(prev + 1, lay + 1)))
            prev = lay
        tail = list(range(prev + 1, m.num_layers))
        base, nblk, mbl, cbase, cblk = [], [], [], [], []
        for blocks in stages_blocks:
            t = mb_t = 0.0
            ct = 0.0
            for b in blocks:
                if b < g:
                    ct += predictor.cpu_block_dense(b, B)
                    continue
                op = predictor.block_dense(b, B, dk)
                t += op.time_s
                mb_t += op.time_s if op.memory_bound else 0.0
            base.append(t)
            nblk.append(sum(1 for b in blocks if b >= g))
            mbl.append(mb_t >= 0.5 * t)
            cbase.append(ct)
            cblk.append(sum(1 for b in blocks if b < g))
        stages.dense_base, stages.dense_blocks, stages.dense_membound = base, nblk, mbl
        tail_gpu = [b for b in tail if b >= g]
        tail_cpu = [b for b in tail if b < g]
        tt = sum(predictor.block_dense(b, B, dk).time_s for b in tail_gpu)
        if self.head_on_gpu:
            head = predictor.head(B, rt.head_kernels if eager else 1)
            stages.tail_base, stages.tail_membound = tt + head.time_s, head.memory_bound
        else:
            stages.tail_base, stages.tail_membound = tt, True
        stages.tail_blocks = len(tail_gpu)
        moe_on_cpu = [lay < g for lay in model_layers]
        ctx = [wl.context_tokens + s for s in range(steps)]
        stages.offload = LayerOffloadTimes(
            cpu_blocks=cblk,
            cpu_base=cbase,
            moe_on_cpu=moe_on_cpu,
            attn=predictor.cpu_attention_core(B, ctx).tolist(),
            tail_cpu_blocks=len(tail_cpu),
            tail_cpu_base=sum(predictor.cpu_block_dense(b, B) for b in tail_cpu),
            head_cpu=None if self.head_on_gpu else predictor.cpu_head(B),
            start_on_host=g > 0,
        )


def llamacpp_layout(scenario, model_layers: list, source: str) -> LlamaCppLayout:
    """The tensor layout of ``scenario``'s llama.cpp run: ``n_gpu_layers`` (llama.cpp's count of
    ``num_layers + 1`` layers, the output layer included, in ``ngl_order``), then the ``-ot``
    overrides (first match wins) and the cache's ``cpu_moe_layers`` (the first N MoE layers'
    experts). InputError for what moesim does not model: overrides moving anything but routed
    expert tensors, or a block's expert tensors split over two devices, or GPU experts in a CPU
    block."""
    m = scenario.model
    cfg = scenario.policies.execution
    L = m.num_layers
    ngl = cfg.n_gpu_layers
    if ngl is None:
        gpu_blocks, head = L, True
    else:
        n = min(ngl, L + 1)
        if cfg.ngl_order == "output_first":
            head = n >= 1
            gpu_blocks = max(0, n - 1)
        else:
            head = n >= L + 1
            gpu_blocks = min(n, L)
    g = L - gpu_blocks
    cache = scenario.policies.cache
    if cache.kind != "all_resident":
        raise InputError(f"llama.cpp's placement is static: use policies.cache.kind all_resident (got {cache.kind})",
                         source=source, field=NGL_FIELD if ngl is not None else OT_FIELD)
    host = set()
    k = getattr(cache, "cpu_moe_layers", 0) or 0
    host.update(model_layers[:k])
    rules = parse_overrides(cfg.override_tensors)
    moe = set(m.moe_layers)

    def place(name: str, default: str) -> tuple[str, str | None]:
        for pat, rx, buft in rules:
            if rx.search(name):
                return buft, pat
        return default, None

    # the token embedding is looked up on the CPU; the final norm and LM head follow the output layer
    head_dev = "CUDA0" if head else "CPU"
    for name, default in (("token_embd.weight", "CPU"), ("output_norm.weight", head_dev), ("output.weight", head_dev)):
        dev, pat = place(name, default)
        if dev != default:
            raise InputError(f"{pat}={dev} moves {name} off its layer's device ({default}); moesim places only "
                             "routed expert tensors (ffn_*_exps) by pattern (use n_gpu_layers for the output layer)",
                             source=source, field=OT_FIELD)
    for b in range(L):
        default = "CPU" if b < g else "CUDA0"
        exps = {}
        for name, role in block_tensors(m, b):
            dev, pat = place(name, default)
            if role == "exps":
                exps[name] = (dev, pat)
            elif dev != default:
                what = "shared-expert" if role == "shexp" else "non-expert"
                raise InputError(
                    f"{pat}={dev} moves {what} tensor {name} off its block's device ({default}); moesim places "
                    "only routed expert tensors (ffn_*_exps) by pattern", source=source, field=OT_FIELD,
                )
        if b not in moe:
            continue
        devs = {d for d, _ in exps.values()}
        if len(devs) > 1:
            shown = ", ".join(f"{n}={d}" for n, (d, _) in exps.items())
            raise InputError(f"block {b}'s expert tensors land on different devices ({shown}); moesim runs a "
                             "block's routed experts in one place", source=source, field=OT_FIELD)
        dev = devs.pop()
        if dev == "CPU":
            host.add(b)
        elif b < g:
            raise InputError(f"block {b} runs on the CPU (n_gpu_layers) but its expert tensors are placed on CUDA0; "
                             "GPU experts in a CPU block are not modelled", source=source, field=OT_FIELD)
    cols = frozenset(c for c, lay in enumerate(model_layers) if lay in host)
    return LlamaCppLayout(num_layers=L, n_gpu_layers=ngl, order=cfg.ngl_order, gpu_from=g, head_on_gpu=head,
                          host_expert_layers=tuple(sorted(host)), host_expert_columns=cols,
                          moe_layers=tuple(model_layers))


class LlamaCpp(ExecutionPolicy):
    """llama.cpp (ggml) hybrid execution (github.com/ggml-org/llama.cpp; no paper): tensors a user
    keeps in host memory are computed there by the CPU backend, everything else on the GPU;
    nothing moves between the two at run time except activations. ggml runs the graph's backend
    splits one after another, so the GPU waits while the CPU computes and the host thread drives
    the CPU work (``cpu_blocks_host``).

    Three ways to keep tensors on the host, combined as llama.cpp combines them:

    * ``n_gpu_layers`` (``-ngl N``): llama.cpp counts ``num_layers + 1`` layers, the output layer
      (final norm + LM head) included, and offloads the *last* ones (llama_model::load_tensors:
      ``i_gpu_start``). Since llama.cpp PR #18148 (Dec 2025) the output layer is offloaded first,
      so ``-ngl N`` puts the output layer and the last ``N - 1`` blocks on the GPU
      (``ngl_order: output_first``); before it, the last ``N`` blocks, the output layer only at
      ``N = num_layers + 1`` (``blocks_first``). A CPU block runs entirely on the CPU: norms,
      attention with its KV cache in host memory, router, shared and routed experts (CPU
      roofline: weight and KV bytes over DRAM bandwidth, FLOPs over peak); the hidden state
      crosses the link where a CPU segment meets a GPU one. Default (None) = every layer on the
      GPU, like ``-ngl 99``. The token embedding is looked up on the CPU in llama.cpp; moesim takes
      it as already where block 0 runs (no copy), as for an all-GPU run.
    * ``override_tensors`` (``-ot REGEX=BUFTYPE``, buffer types ``CPU`` / ``CUDA0``): matched with
      ``re.search`` against each tensor's GGUF name (``blk.{i}.ffn_{gate,up,down}_exps.weight``,
      ``blk.{i}.attn_*``, ...), the first matching override wins (llama.cpp's loader: std::regex_search,
      first match, break). Routed-expert tensors mapped to ``CPU`` live in host memory and run on
      the CPU, for any set of blocks. Python ``re`` stands in for ECMAScript ``std::regex`` (the
      same for the patterns people write). Moving other tensors (attention, norms, router, shared
      experts ``ffn_*_shexp``) off their block's device is refused, not modelled.
    * the cache's ``cpu_moe_layers: N`` (``--n-cpu-moe N``): the experts of the first N MoE
      layers, the same as the pattern ``blk\\.(0|..|N-1)\\.ffn_(up|down|gate)_exps=CPU`` where every
      block is an MoE block.

    Left out: ggml's quantised CPU kernels (CPU time comes from the CPU table/roofline at the
    model's dtypes), per-op CPU overheads and graph-split costs, and ggml's offload of large
    batches' CPU-resident weight ops to the GPU (``--no-op-offload``; decode batches are below its
    threshold). CPU time of whole blocks is booked on the critical path as ``cpu_expert``."""

    uses_cpu = True
    cpu_blocks_host = True

    class Config(CpuExecConfig):
        """Non-resident experts run on the CPU backend; optional ``-ngl`` / ``-ot`` layout."""

        kind: Literal["llamacpp"] = "llamacpp"
        n_gpu_layers: int | None = Field(
            default=None, ge=0,
            description="llama.cpp -ngl: layers (of num_layers + 1, the output layer included) on the GPU; None = all",
        )
        ngl_order: Literal["output_first", "blocks_first"] = Field(
            default="output_first",
            description="which layer -ngl offloads first: the output layer (llama.cpp since Dec 2025) or the last block",
        )
        override_tensors: list[str] = Field(
            default_factory=list, description="llama.cpp -ot values REGEX=BUFTYPE (CPU or CUDA0), first match wins"
        )

        @field_validator("override_tensors", mode="before")
        @classmethod
        def _one_or_list(cls, v):
            return [v] if isinstance(v, str) else v  # one -ot value, or a list of them

        @field_validator("override_tensors")
        @classmethod
        def _parse(cls, v):
            parse_overrides(v)
            return v

        @model_serializer(mode="wrap")
        def _drop_defaults(self, handler):
            # the layout fields are left out of the resolved scenario while at their defaults, so
            # the hashes of scenarios written before they existed do not change
            d = handler(self)
            if isinstance(d, dict):
                for k, dflt in (("n_gpu_layers", None), ("ngl_order", "output_first"), ("override_tensors", [])):
                    if d.get(k, 0) == dflt:
                        d.pop(k)
            return d

    #: the layout, set by the engine builder when ``n_gpu_layers`` or ``override_tensors`` is used
    offload: LlamaCppLayout | None = None

    @staticmethod
    def layer_offload(scenario, model_layers: list, source: str) -> LlamaCppLayout | None:
        """The run's tensor layout when ``n_gpu_layers`` or ``override_tensors`` is set (the
        engine builder gives its host expert columns to the cache and its CPU stage times to the
        engine), else None (the cache's ``cpu_moe_layers`` alone, as before)."""
        cfg = scenario.policies.execution
        if cfg.n_gpu_layers is None and not cfg.override_tensors:
            return None
        lay = llamacpp_layout(scenario, model_layers, source)
        if lay.partial:
            rt, wl = scenario.runtime, scenario.workload
            if wl.requests is not None:
                raise InputError("whole-layer offload is modelled for fixed-batch runs only (not workload.requests)",
                                 source=source, field=NGL_FIELD)
            if rt.dense_weights == "streamed":
                raise InputError("blocks kept on the CPU do not combine with runtime.dense_weights: streamed",
                                 source=source, field=NGL_FIELD)
        return lay

    def split(self, column, experts, counts, is_resident):
        return {e for e in experts if not is_resident(e)}

    def report(self, counters: dict) -> dict:
        lay = self.offload
        if lay is None:
            return {}
        return {
            "n_gpu_layers": lay.n_gpu_layers,
            "ngl_order": lay.order,
            "layers_on_gpu": lay.offloaded(),
            "cpu_blocks": lay.gpu_from,
            "output_layer": "gpu" if lay.head_on_gpu else "cpu",
            "host_expert_layers": list(lay.host_expert_layers),
            "boundaries_per_step": lay.boundaries(),
        }
