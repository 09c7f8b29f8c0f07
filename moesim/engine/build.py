"""From a validated scenario to a ready engine: trace, plan, memory check, predictor, policies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.engine.plan import DecodePlan, ServingPlan, build_plan
from moesim.engine.single_gpu import SingleGpuEngine, StageTimes
from moesim.errors import InputError
from moesim.hardware.links import LinkModel
from moesim.hardware.tiers import resolve_tiers
from moesim.perf.predictor import Predictor
from moesim.policies.base import registry
from moesim.policies.cache.base import CacheSetup

GIB = 2**30


@dataclass
class Prepared:
    """Everything a run needs, built and checked before the simulation starts."""

    scenario: object
    trace: object
    trace_sha256: str | None
    plan: DecodePlan
    col_src: list
    model_layers: list
    engine: SingleGpuEngine
    predictor: Predictor
    memory: dict
    routing_note: str
    notes: list
    serving: object = None  # moesim.serving.scheduler.Scheduler of a serving run, else None


def load_routing(scenario, source: str):
    """The scenario's trace: loaded from ``trace.path`` or synthesised (seeded)."""
    from moesim.traces import load_trace

    tc = scenario.trace
    m = scenario.model
    if tc.path is not None:
        trace = load_trace(tc.path)
        return trace, trace.sha256
    layers = list(tc.layers) if tc.layers else list(m.moe_layers)
    trace = tc.synthetic.make(
        layers=layers, num_experts=m.num_experts, top_k=m.top_k, scenario_seed=scenario.seed, model_name=m.name
    )
    return trace, None


def _norm_model_name(name: str) -> str:
    return name.lower().rsplit("/", 1)[-1].replace("_", "-")


def map_columns(model, trace_layers: tuple) -> tuple[list, list, list]:
    """Simulated MoE layers (all of the model's), the trace column each replays (a covered layer its
    own column, an uncovered one the column of the nearest covered layer, lower on ties), and the
    (uncovered layer, borrowed layer) pairs."""
    layers = list(model.moe_layers)
    col_of = {l: i for i, l in enumerate(trace_layers)}
    src = []
    borrowed = []
    for l in layers:
        if l in col_of:
            src.append(col_of[l])
        else:
            nearest = min(trace_layers, key=lambda t: (abs(t - l), t))
            src.append(col_of[nearest])
            borrowed.append((l, nearest))
    return layers, src, borrowed


def memory_check(scenario, cache, source: str, sizes=None, offload=None) -> dict:
    """GPU and host memory use (bytes); an InputError naming the numbers when it does not fit.
    ``sizes``: the run's :class:`~moesim.models.expert_sizes.ExpertSizes` (heterogeneous experts:
    the host store holds their own bytes, a transient buffer the largest), or None. ``offload``: a
    whole-layer layout (:class:`~moesim.policies.execution.llamacpp.LlamaCppLayout`) whose CPU
    blocks keep their weights and KV cache in host memory, or None."""
    m, hw, wl = scenario.model, scenario.hardware, scenario.workload
    g = hw.gpu
    usable = (g.hbm_gib - g.reserved_gib) * GIB
    dense = m.dense_bytes
    if scenario.runtime.dense_weights == "streamed":
        # resident: the embedding and LM head and the trailing blocks; streamed: a double buffer of
        # the largest stage (the non-expert blocks up to and including one MoE block)
        stage_max, prev = 0, -1
        for l in m.moe_layers:
            stage_max = max(stage_max, sum(m.block_dense_params(b) for b in range(prev + 1, l + 1)))
            prev = l
        tail = sum(m.block_dense_params(b) for b in range(prev + 1, m.num_layers))
        dense = int((m.embedding_params * m.embedding_bytes_per_param) + (tail + 2 * stage_max) * m.bytes_per_param)
    serving = wl.requests is not None
    kv_tok, host_dense, host_kv = m.kv_bytes_per_token, 0, 0
    if offload is not None and offload.partial:  # CPU blocks: weights and KV cache in host memory
        host_dense = offload.host_dense_bytes(m)
        dense -= host_dense
        kv_tok = m.kv_bytes_per_token_layer * offload.gpu_blocks()
        host_kv = wl.batch_size * (wl.context_tokens + wl.max_tokens // wl.batch_size) * (
            m.kv_bytes_per_token - kv_tok)
    if serving:
        kv = 0  # the KV budget is what is left (below)
    else:
        kv = wl.batch_size * (wl.context_tokens + wl.max_tokens // wl.batch_size) * kv_tok
    cache_b = cache.resident_slots_bytes()
    tbuf = cache.transient_buffer_count() * (cache.expert_bytes if sizes is None else sizes.max_bytes)
    need = dense + kv + cache_b + tbuf
    if serving:
        kv = kv_budget(scenario, usable, need, dense, cache_b, tbuf, cache, source)
        need += kv
    kind = scenario.policies.cache.kind
    if sizes is not None:  # heterogeneous experts: their own bytes; all_resident keeps its pool's off the host
        host_store = sizes.total_bytes - (cache_b if kind == "all_resident" else 0)
    elif kind == "all_resident":  # only experts kept off the GPU need a home copy
        host_store = m.total_expert_bytes - cache.slots_total() * m.expert_bytes
    else:
        host_store = m.total_expert_bytes
    store = scenario.runtime.expert_store
    host_cap = hw.host_memory.capacity_gib * GIB
    # a pinned capacity splits the home copies over tiers (moesim.hardware.tiers.resolve_tiers)
    tiered = hw.host_memory.pinned_capacity_gib is not None and store != "ssd"
    if store == "auto" and not tiered:
        fits = (host_store + (need if g.unified_memory else 0)) <= host_cap
        store = "dram" if fits or hw.storage is None or host_store == 0 else "ssd"
    if store == "ssd":
        if hw.storage is None:
            raise InputError(
                "ssd needs hardware.storage (read_gb_s, latency_us, capacity_gib)",
                source=source,
                field="runtime.expert_store",
            )
        if host_store > hw.storage.capacity_gib * GIB:
            raise InputError(
                f"experts need {host_store / GIB:.2f} GiB, more than the {hw.storage.capacity_gib:g} GiB storage",
                source=source,
                field="hardware.storage.capacity_gib",
            )
        ssd_bytes, host_store = host_store, 0
    mem = {
        "gpu_usable_bytes": int(usable),
        "dense_bytes": int(dense),
        "kv_bytes": int(kv),
        "expert_cache_bytes": int(cache_b),
        "transient_buffer_bytes": int(tbuf),
        "gpu_used_bytes": int(need),
        "host_expert_bytes": int(host_store),
        "expert_store": store,
        "ssd_expert_bytes": int(ssd_bytes) if store == "ssd" else 0,
    }
    if host_dense or host_kv:
        mem["host_dense_bytes"] = int(host_dense)
        mem["host_kv_bytes"] = int(host_kv)
    if serving:
        mem["kv_budget_bytes"] = int(kv)
    if sizes is not None:
        mem["expert_sizes"] = sizes.summary()
    if g.unified_memory:
        # one DRAM: the GPU's share and the host's expert store come out of the same capacity
        total = need + host_store + host_dense + host_kv
        cap = hw.host_memory.capacity_gib * GIB
        if total > cap:
            raise InputError(
                f"does not fit in unified memory: GPU {need / GIB:.2f} GiB + host expert store "
                f"{host_store / GIB:.2f} GiB = {total / GIB:.2f} GiB > {cap / GIB:.2f} GiB",
                source=source,
                field="hardware.host_memory.capacity_gib",
            )
    if need > usable:
        fld = "policies.cache." + (
            "capacity_gib" if getattr(scenario.policies.cache, "capacity_gib", None) else "capacity_experts"
        )
        if kind in ("all_resident", "streaming"):
            fld = "policies.cache.kind"
        if offload is not None and offload.n_gpu_layers is not None:  # llama.cpp -ngl: offload fewer layers
            fld = "policies.execution.n_gpu_layers"
        raise InputError(
            f"does not fit in GPU memory: dense weights {dense / GIB:.2f} GiB + KV cache "
            f"{kv / GIB:.2f} GiB + expert cache {cache_b / GIB:.2f} GiB ({cache.slots_total()} slots) "
            f"+ transient buffers {tbuf / GIB:.2f} GiB = {need / GIB:.2f} GiB > {usable / GIB:.2f} GiB "
            f"usable ({g.hbm_gib:g} GiB HBM - {g.reserved_gib:g} GiB reserved)",
            source=source,
            field=fld,
        )
    if not g.unified_memory and not tiered and host_store > hw.host_memory.capacity_gib * GIB:
        raise InputError(
            f"experts need {host_store / GIB:.2f} GiB of host memory, more than its "
            f"{hw.host_memory.capacity_gib:g} GiB (add hardware.storage to keep them on flash)",
            source=source,
            field="hardware.host_memory.capacity_gib",
        )
    if not g.unified_memory and (host_dense or host_kv):
        host_all = host_store + host_dense + host_kv
        if host_all > hw.host_memory.capacity_gib * GIB:
            raise InputError(
                f"host memory holds experts {host_store / GIB:.2f} GiB + CPU blocks' weights {host_dense / GIB:.2f} "
                f"GiB + their KV cache {host_kv / GIB:.2f} GiB = {host_all / GIB:.2f} GiB, more than its "
                f"{hw.host_memory.capacity_gib:g} GiB", source=source, field="hardware.host_memory.capacity_gib",
            )
    return mem


def kv_budget(scenario, usable, need, dense, cache_b, tbuf, cache, source) -> int:
    """A serving run's KV budget (bytes): usable HBM minus dense weights, expert-cache slots and
    transient buffers, or ``workload.requests.kv_cache_gib`` when that is smaller."""
    req = scenario.workload.requests
    left = int(usable - need)
    what = (f"dense weights {dense / GIB:.2f} GiB + expert cache {cache_b / GIB:.2f} GiB "
            f"({cache.slots_total()} slots) + transient buffers {tbuf / GIB:.2f} GiB = {need / GIB:.2f} GiB "
            f"of {usable / GIB:.2f} GiB usable")
    if left <= 0:
        raise InputError(f"leaves no GPU memory for the KV cache: {what}", source=source,
                         field="policies.cache." + ("capacity_gib" if getattr(scenario.policies.cache, "capacity_gib", None)
                                                    else "capacity_experts"))
    if req.kv_cache_gib is None:
        return left
    cap = int(req.kv_cache_gib * GIB)
    if cap > left:
        raise InputError(f"{req.kv_cache_gib:g} GiB does not fit: {what} leave {left / GIB:.2f} GiB",
                         source=source, field="workload.requests.kv_cache_gib")
    return cap


def precision_setup(scenario, setup: CacheSetup, link: LinkModel, max_tokens: int | None = None):
    """The engine's :class:`~moesim.policies.precision.base.PrecisionRun` (levels' bytes, copy and
    kernel times, mean-weight function), or None for full precision."""
    from moesim.policies.precision.base import precision_run

    cfg = scenario.policies.precision
    if cfg.kind == "full":
        return None
    policy = registry("precision")[cfg.kind](cfg, setup)
    m, rt, wl, hw = scenario.model, scenario.runtime, scenario.workload, scenario.hardware

    def pred(model):
        return Predictor(model, hw, rt.dequant, rt.dequant_ops_per_weight)

    return precision_run(policy, m, pred(m), link, pinned=rt.host_memory == "pinned",
                         kernels=rt.kernels_per_expert if rt.launch_mode == "eager" else 1,
                         max_tokens=max_tokens or wl.batch_size, setup=setup, model_predictor=pred)


def expert_sizes(scenario, routing, col_src, source: str):
    """The run's :class:`~moesim.models.expert_sizes.ExpertSizes` (from the routing policy, else the
    model), or None when all experts have the model's one size; refuses the policies that assume
    one expert size (mixed precision's low-precision copies, CPU execution's cost tables)."""
    from moesim.models.expert_sizes import resolve

    mult = None if routing is None else routing[1].size_multipliers
    sizes = resolve(scenario.model, mult, col_src, source=source)
    if sizes is None:
        return None
    for fam, ok in (("precision", "full"), ("execution", "gpu_only")):
        kind = getattr(scenario.policies, fam).kind
        if kind != ok:
            raise InputError(
                f"{kind} assumes one expert size; heterogeneous experts ({sizes.source}) run with "
                f"{fam} {ok}", source=source, field=f"policies.{fam}.kind",
            )
    return sizes


def sized_costs(sizes, scenario, predictor: Predictor, link: LinkModel, max_tokens: int) -> tuple:
    """Per cache key (``column * E + expert``) of heterogeneous experts: bytes, copy seconds, and
    the GPU time and memory-bound flag of its kernel by token count (one table per size class,
    shared by its keys), as the single-GPU engine reads them."""
    rt = scenario.runtime
    k_exp = rt.kernels_per_expert if rt.launch_mode == "eager" else 1
    pinned = rt.host_memory == "pinned"
    tabs = []
    for c in sizes.classes:
        t, mb = predictor.expert_times(np.arange(max_tokens + 1), kernels=k_exp, size=c)
        tabs.append((t.tolist(), [bool(x) for x in mb]))
    dur = {b: link.duration_s(b, "h2d", pinned=pinned) for b in set(sizes.key_bytes)}
    kcopy = [dur[b] for b in sizes.key_bytes]
    ktab = [tabs[i][0] for i in sizes.class_of_key]
    kmb = [tabs[i][1] for i in sizes.class_of_key]
    return list(sizes.key_bytes), kcopy, ktab, kmb


def activation_bytes_per_token(model) -> int:
    """Bytes of one token's hidden state (what crosses the link when an expert runs on the CPU)."""
    return int(model.hidden_size * model.bytes_per_param)


class StageTable:
    """GPU times of a step's stages as functions of its token count, computed once per count and
    cached (a serving run's steps hold any number of tokens; the fixed-batch path asks for one).

    ``dense(n)``: per MoE column, the non-attention-core time of its dense stage (the blocks since
    the previous MoE layer, for ``n`` tokens) and whether it is memory-bound; ``tail(n, n_sample)``:
    the trailing dense blocks for ``n`` tokens plus the final norm, LM head and sampling for the
    ``n_sample`` sequences that produce a token this step (a prefill chunk that does not finish its
    prompt samples nothing); ``attention(ctx_sum, kv_sum)``: the attention core of one block for
    tokens whose contexts sum to ``ctx_sum`` (FLOPs) reading ``kv_sum`` tokens of KV (bytes), as one
    roofline op: ``predictor.attention_core`` summed over sequences."""

    def __init__(self, scenario, predictor: Predictor, model_layers: list):
        m, rt = scenario.model, scenario.runtime
        self.predictor = predictor
        self.eager = rt.launch_mode == "eager"
        self.dk = rt.dense_kernels_per_layer if self.eager else 1
        self.head_k = rt.head_kernels if self.eager else 1
        self.blocks_before = []
        prev = -1
        for l in model_layers:
            self.blocks_before.append(list(range(prev + 1, l + 1)))
            prev = l
        self.tail_blocks = list(range(prev + 1, m.num_layers))
        self.core1 = m.attention_core_flops(1)
        self.kvtl = m.kv_bytes_per_token_layer
        self._dense: dict = {}
        self._tail: dict = {}

    def dense(self, n: int) -> tuple[list, list]:
        """``(dense_base, dense_membound)`` per MoE column for a step of ``n`` tokens."""
        got = self._dense.get(n)
        if got is None:
            base, mb = [], []
            for blocks in self.blocks_before:
                t = 0.0
                mb_t = 0.0
                for b in blocks:
                    op = self.predictor.block_dense(b, n, self.dk)
                    t += op.time_s
                    mb_t += op.time_s if op.memory_bound else 0.0
                base.append(t)
                mb.append(mb_t >= 0.5 * t)
            got = self._dense[n] = (base, mb)
        return got

    def tail(self, n: int, n_sample: int) -> tuple[float, bool]:
        """``(tail_base, tail_membound)``: trailing blocks for ``n`` tokens, head for ``n_sample``."""
        key = (n, n_sample)
        got = self._tail.get(key)
        if got is None:
            tail_t = 0.0
            for b in self.tail_blocks:
                tail_t += self.predictor.block_dense(b, n, self.dk).time_s
            if n_sample:
                head = self.predictor.head(n_sample, self.head_k)
                got = (tail_t + head.time_s, head.memory_bound)
            else:  # no sequence samples (a prefill chunk that does not end its prompt): no head
                got = (tail_t, True)
            self._tail[key] = got
        return got

    def attention(self, ctx_sum: float, kv_sum: float) -> float:
        """Attention-core time of one block (seconds)."""
        p = self.predictor
        tf = self.core1 * ctx_sum / p.flops_dense
        tb = self.kvtl * kv_sum / p.mem_bw
        return tf if tf > tb else tb


def stage_times(scenario, predictor: Predictor, model_layers: list, steps: int, link: LinkModel,
                max_tokens: int | None = None, table: StageTable | None = None) -> StageTimes:
    """Precompute the GPU time of each stage: dense parts per MoE layer, attention per step,
    the tail, and expert time by token count (up to ``max_tokens``, default the batch size)."""
    m, rt, wl = scenario.model, scenario.runtime, scenario.workload
    B = wl.batch_size
    N = B if max_tokens is None else max_tokens
    eager = rt.launch_mode == "eager"
    act_bytes = activation_bytes_per_token(m)
    table = table or StageTable(scenario, predictor, model_layers)
    dense_base, dense_mb = table.dense(B)
    dense_bytes = [int(sum(m.block_dense_params(b) for b in blocks) * m.bytes_per_param) for blocks in table.blocks_before]
    ctx = wl.context_tokens + np.arange(steps)
    attn, _ = predictor.attention_core(B, ctx)
    tail_base, tail_mb = table.tail(B, B)
    k_exp = rt.kernels_per_expert if eager else 1
    # a token picks an expert at most once, so one expert serves at most N tokens per step
    texp, tmb = predictor.expert_times(np.arange(N + 1), kernels=k_exp)
    pinned = rt.host_memory == "pinned"
    return StageTimes(
        dense_base=list(dense_base),
        dense_blocks=[len(b) for b in table.blocks_before],
        dense_membound=list(dense_mb),
        attn=attn.tolist(),
        tail_base=tail_base,
        tail_blocks=len(table.tail_blocks),
        tail_membound=tail_mb,
        expert=texp.tolist(),
        expert_membound=[bool(x) for x in tmb],
        expert_fixed=predictor.expert_fixed_s(k_exp),
        cpu_expert=predictor.cpu_expert_times(np.arange(N + 1)).tolist(),
        act_d2h=_act_table(link, N, act_bytes, "d2h"),
        act_h2d=_act_table(link, N, act_bytes, "h2d"),
        dense_bytes=dense_bytes,
        dense_copy=[link.duration_s(b, "h2d", pinned=pinned) for b in dense_bytes],
    )


def _cpu_model(scenario, execution, predictor: Predictor, stages: StageTimes, source: str):
    """The CPU thread-worker model (moesim.perf.cpu) when the execution policy computes experts on
    the CPU with settings beyond the aggregate model, or needs the worker scheduler; else None."""
    cfg = scenario.policies.execution
    detailed = getattr(cfg, "detailed_cpu", None)
    if not execution.uses_cpu or not (execution.needs_cpu_scheduler or (detailed is not None and detailed())):
        return None
    from moesim.perf.cpu import cpu_expert_model

    n = len(stages.cpu_expert) - 1
    try:
        model = cpu_expert_model(
            scenario.model, scenario.hardware, cfg, stages.cpu_expert,
            lambda t: predictor.cpu_expert_times(np.arange(n + 1), threads=t), scenario.model.num_experts,
        )
    except InputError as e:
        raise InputError(e.message, source=source, field=e.field) from None
    predictor.cpu_model_note = model.describe()
    return model


def _act_table(link: LinkModel, n: int, act_bytes: int, direction: str) -> list:
    """Activation copy time for 0..n tokens (pinned)."""
    return [link.duration_s(int(k * act_bytes), direction, pinned=True) if k else 0.0 for k in range(n + 1)]


def prepare(scenario, *, source: str = "scenario", record_timeline: bool = True, progress=None) -> Prepared:
    """Build and check everything for a run of ``scenario``; raises InputError on bad input."""
    from moesim.traces import check_trace_against_model

    m, hw, wl, rt = scenario.model, scenario.hardware, scenario.workload, scenario.runtime
    trace, sha = load_routing(scenario, source)
    tsrc = scenario.trace.path or source
    trace_layers = check_trace_against_model(
        trace,
        num_experts=m.num_experts,
        moe_layers=m.moe_layers,
        layers=scenario.trace.layers,
        source=tsrc,
    )
    trace_layers = tuple(int(x) for x in trace_layers)
    routing = apply_routing(scenario, trace, source)
    if routing is not None:
        trace = routing[0]
    model_layers, col_src, borrowed = map_columns(m, trace_layers)
    sizes = expert_sizes(scenario, routing, col_src, source)
    serving_in = None
    if wl.requests is not None:
        serving_in = _serving_inputs(scenario, trace, source)
        plan = ServingPlan(np.asarray(trace.experts), num_columns=trace.num_layers,
                           batch_size=serving_in["max_step_tokens"], notes=serving_in["notes"])
        warm_steps = 0
    else:
        try:
            plan = build_plan(
                np.asarray(trace.experts),
                batch_size=wl.batch_size,
                max_tokens=wl.max_tokens,
                loop_trace=wl.loop_trace,
            )
        except ValueError as exc:
            raise InputError(str(exc), source=source, field="workload.batch_size") from None
        warm_steps = wl.warmup_tokens // wl.batch_size
    if serving_in is None and warm_steps >= plan.steps:
        raise InputError(
            f"warm-up of {warm_steps} steps leaves nothing to measure in {plan.steps} steps",
            source=source,
            field="workload.warmup_tokens",
        )
    if not rt.wait_for_router:
        if scenario.policies.cache.kind != "all_resident":
            raise InputError(
                "false needs every expert resident (policies.cache.kind: all_resident): without "
                "reading the router the host cannot decide loads",
                source=source,
                field="runtime.wait_for_router",
            )
        if rt.launch_mode == "eager":
            raise InputError(
                "false needs launch_mode graph or fused (eager launches need the experts on the host)",
                source=source,
                field="runtime.wait_for_router",
            )

    cache_cls = registry("cache")[scenario.policies.cache.kind]
    setup = CacheSetup(
        num_columns=len(model_layers),
        num_experts=m.num_experts,
        expert_bytes=m.expert_bytes,
        top_k=m.top_k,
        model_layers=tuple(model_layers),
        max_distinct_per_step=plan.max_distinct,
        source=source,
        plan=plan,
        col_src=tuple(col_src),
        experts=np.asarray(trace.experts),
        weights=None if trace.weights is None else np.asarray(trace.weights),
        batch_size=wl.batch_size,
        key_bytes=None if sizes is None else sizes.key_bytes,
    )
    if serving_in is not None:
        _check_serving_policies(scenario, source)
    # a static tensor layout of the execution policy (llama.cpp -ngl / -ot): which columns' experts
    # stay in host memory (the cache is told) and which blocks run on the CPU (memory, stage times)
    layout_of = getattr(registry("execution")[scenario.policies.execution.kind], "layer_offload", None)
    offload = layout_of(scenario, model_layers, source) if layout_of is not None else None
    cache = cache_cls(scenario.policies.cache, setup,
                      **({} if offload is None else {"host_columns": offload.host_expert_columns}))
    if cache.transient_buffer_count() == 0 and cache.slots_total() < len(model_layers) * m.num_experts:
        raise InputError("needs at least one transient buffer", source=source, field="policies.cache")
    memory = memory_check(scenario, cache, source, sizes, offload)
    tiers = resolve_tiers(scenario, memory, np.asarray(trace.experts), col_src,
                          None if sizes is None else sizes.key_bytes, source)
    if memory["expert_store"] in ("ssd", "dram+ssd") and scenario.policies.execution.kind != "gpu_only":
        raise InputError(
            "CPU execution of experts that live on flash is not modelled; use gpu_only or keep the "
            "experts in DRAM (runtime.expert_store: dram)",
            source=source,
            field="policies.execution.kind",
        )
    prefetcher = None
    pf_cfg = scenario.policies.prefetch
    if pf_cfg.kind != "none":
        from moesim.policies.prefetch.base import PrefetchSetup

        prefetcher = registry("prefetch")[pf_cfg.kind](
            pf_cfg,
            PrefetchSetup(
                num_columns=len(model_layers),
                num_experts=m.num_experts,
                top_k=m.top_k,
                plan=plan,
                col_src=tuple(col_src),
                experts=np.asarray(trace.experts),
                batch_size=wl.batch_size,
                seed=scenario.seed,
                source=source,
                trace=trace,
            ),
        )
    predictor = Predictor(m, hw, rt.dequant, rt.dequant_ops_per_weight)
    link = LinkModel(hw)
    copy_s = link.duration_s(m.expert_bytes, "h2d", pinned=rt.host_memory == "pinned")
    table = StageTable(scenario, predictor, model_layers)
    stages = stage_times(scenario, predictor, model_layers, plan.steps if serving_in is None else 0, link,
                         max_tokens=plan.batch_size, table=table)
    if offload is not None and offload.partial:  # CPU blocks: GPU stage times of the GPU blocks only
        offload.stage_times(stages, scenario, predictor, model_layers, plan.steps)
    sched = None
    if serving_in is not None:
        sched = _scheduler(scenario, serving_in, memory, plan, table, source)
    ex_cfg = scenario.policies.execution
    execution = registry("execution")[ex_cfg.kind](ex_cfg, setup)
    if offload is not None:
        execution.offload = offload
    execution.bind_seed(scenario.seed)
    cpu_model = _cpu_model(scenario, execution, predictor, stages, source)
    execution.bind_costs(
        gpu_t=stages.expert, cpu_t=stages.cpu_expert if cpu_model is None else cpu_model.times(len(stages.cpu_expert) - 1),
        copy_s=copy_s, act_s=(stages.act_d2h[1] + stages.act_h2d[1]) if len(stages.act_d2h) > 1 else 0.0,
    )
    engine = SingleGpuEngine(
        plan=plan,
        col_src=col_src,
        model_layers=model_layers,
        cache=cache,
        stage=stages,
        hw=hw,
        runtime=rt,
        expert_bytes=m.expert_bytes,
        copy_s=copy_s,
        warmup_steps=warm_steps,
        record_timeline=record_timeline,
        progress=progress,
        prefetcher=prefetcher,
        execution=execution,
        act_bytes_per_token=activation_bytes_per_token(m),
        storage=hw.storage if memory["expert_store"] in ("ssd", "dram+ssd") else None,
        tiers=None if tiers is None else tiers.tier_of,
        copy_time=lambda nbytes, pinned: link.duration_s(nbytes, "h2d", pinned=pinned),
        precision=precision_setup(scenario, setup, link, plan.batch_size),
        serving=sched,
        sizes=None if sizes is None else sized_costs(sizes, scenario, predictor, link, plan.batch_size),
    )
    engine.cpu_model = cpu_model
    note = routing_note(scenario, trace, trace_layers, borrowed, plan, serving=serving_in)
    return Prepared(
        scenario=scenario,
        trace=trace,
        trace_sha256=sha,
        plan=plan,
        col_src=col_src,
        model_layers=model_layers,
        engine=engine,
        predictor=predictor,
        memory=memory,
        routing_note=note,
        notes=list(plan.notes),
        serving=sched,
    )


# ----- serving runs (workload.requests) ------------------------------------------------------------
#: policies that need the run's whole future access sequence, which a serving run does not have
#: before it runs (its batches depend on timing)
SERVING_UNSUPPORTED = {("cache", "belady"), ("prefetch", "path_table")}


def _serving_inputs(scenario, trace, source: str) -> dict:
    """Requests (arrivals, lengths, trace rows) and the batching policy of a serving run."""
    from moesim.policies.batching.base import BatchingSetup
    from moesim.serving.arrivals import make_arrivals
    from moesim.serving.requests import build_requests

    if getattr(scenario, "cluster", None) is not None:  # pragma: no cover - the schema refuses it
        raise InputError("serving runs on one GPU", source=source, field="workload.requests")
    cfg = scenario.workload.requests
    arrivals = make_arrivals(cfg, scenario.seed, source)
    requests, notes, mode = build_requests(arrivals, trace, cfg, scenario.seed, source)
    bcfg = scenario.policies.batching
    sizes = sorted((r.positions for r in requests), reverse=True)
    policy = registry("batching")[bcfg.kind](
        bcfg, BatchingSetup(batch_size=scenario.workload.batch_size, prefill_sizes=tuple(sizes), source=source,
                            experts=np.asarray(trace.experts))
    )
    return {
        "requests": requests,
        "policy": policy,
        "notes": notes,
        "routing_rows": mode,
        "arrivals": arrivals,
        "max_step_tokens": max(1, int(policy.max_step_tokens())),
        "longest": sizes[0] if sizes else 1,
    }


def _check_serving_policies(scenario, source: str) -> None:
    for fam, kind in SERVING_UNSUPPORTED:
        if getattr(scenario.policies, fam).kind == kind:
            raise InputError(
                f"{kind} needs the whole future access sequence, which a serving run (workload.requests) "
                "does not have before it runs: its batches depend on arrival and step times",
                source=source,
                field=f"policies.{fam}.kind",
            )


def _scheduler(scenario, serving_in: dict, memory: dict, plan, table, source: str):
    """The serving scheduler with its KV budget; refuses a budget below the largest request."""
    from moesim.serving.scheduler import KvState, Scheduler

    cfg = scenario.workload.requests
    m = scenario.model
    kv = KvState(budget_bytes=memory["kv_budget_bytes"], bytes_per_token=m.kv_bytes_per_token,
                 block_tokens=cfg.kv_block_tokens)
    longest = serving_in["longest"]
    if kv.blocks(longest) > kv.budget_blocks:
        need = kv.blocks(longest) * kv.block_bytes
        raise InputError(
            f"the longest request ({longest} token positions) needs {need / GIB:.3f} GiB of KV, more than "
            f"the KV budget of {kv.budget_bytes / GIB:.3f} GiB ({m.kv_bytes_per_token} bytes per token): it "
            "could never run",
            source=source,
            field="workload.requests.kv_cache_gib" if cfg.kv_cache_gib is not None else "workload.requests",
        )
    sched = Scheduler(requests=serving_in["requests"], policy=serving_in["policy"], kv=kv, kv_policy=cfg.kv_policy,
                      plan=plan, table=table, warmup_requests=cfg.warmup_requests)
    sched.routing_rows = serving_in["routing_rows"]
    return sched


def apply_routing(scenario, trace, source: str, step_rows: int | None = None):
    """The trace with the scenario's routing policy applied (a copy), and what it changed; None
    when the routing is replayed unchanged. ``step_rows``: trace rows of one decode step, the
    steps its ``effects`` count in (default ``workload.batch_size``: one GPU's batch)."""
    import dataclasses

    cfg = scenario.policies.routing
    if cfg.kind == "none":
        return None
    pol = registry("routing")[cfg.kind](cfg, None)
    pol.setup = type("RoutingSetup", (), {"source": source})()
    kw = {"expert_params": scenario.model.expert_params} if "expert_params" in pol.extra_inputs else {}
    res = pol.transform_trace(trace, num_experts=scenario.model.num_experts, seed=scenario.seed,
                              expert_bytes=scenario.model.expert_bytes, **kw)
    note = res.note
    extra = {}
    if res.rows is not None:  # the policy reordered or repeated rows: per-row arrays follow them
        for name in ("probs", "request", "token", "step", "phase", "spec_next"):
            arr = getattr(trace, name)
            if arr is not None:
                extra[name] = np.asarray(arr)[res.rows]
        if scenario.workload.requests is not None:
            note += ("; in a serving run the scheduler takes the reordered rows as its requests' routing and forms "
                     "the steps itself, so the policy's row order holds only within each request")
    meta = dict(trace.meta or {})
    # bytes moved, compute, cache and quality before vs after (steps of batch_size rows)
    effects = pol.effects(trace, res, num_experts=scenario.model.num_experts,
                          expert_bytes=scenario.model.expert_bytes,
                          step_rows=scenario.workload.batch_size if step_rows is None else step_rows)
    meta["routing_transform"] = {"kind": cfg.kind, "note": note, **res.stats, "effects": effects}
    return dataclasses.replace(trace, experts=res.experts, weights=res.weights, meta=meta, **extra), res


def routing_note(scenario, trace, trace_layers, borrowed, plan, serving=None) -> str:
    """Where the routing came from and which replay assumptions the run makes."""
    m = scenario.model
    meta = trace.meta or {}
    parts = []
    if scenario.trace.path is not None:
        src = meta.get("source") or "unknown source"
        parts.append(f"routing replayed from trace {scenario.trace.path} ({src})")
    else:
        parts.append(f"routing from the synthetic generator ({meta.get('source', 'moesim.traces.synthetic')})")
    tmodel = meta.get("model")
    if tmodel and _norm_model_name(str(tmodel)) != _norm_model_name(m.name):
        parts.append(
            f"WARNING: trace captured from {tmodel} but replayed on model {m.name}: routing is not that model's"
        )
    k = trace.experts.shape[2]
    if k != m.top_k and not meta.get("routing_transform"):
        parts.append(f"trace has {k} experts per token, the model's top_k is {m.top_k}; the trace's choices are replayed")
    if borrowed:
        shown = ", ".join(f"{l}<-{src}" for l, src in borrowed[:6])
        more = f" (+{len(borrowed) - 6} more)" if len(borrowed) > 6 else ""
        parts.append(
            f"{len(borrowed)} of {len(m.moe_layers)} MoE layers have no trace column and replay the "
            f"nearest traced layer's routing (model layer<-traced layer: {shown}{more})"
        )
    if trace.request is not None and serving is None:
        parts.append("trace request ids ignored: consecutive rows form each decode step")
    tr = meta.get("routing_transform")
    if tr:
        parts.append(f"routing policy {tr['kind']}: {tr['note']}")
    parts.extend(plan.notes)
    parts.append("routing is treated as independent of system choices (precision, skipping, merging)")
    return "; ".join(parts)
