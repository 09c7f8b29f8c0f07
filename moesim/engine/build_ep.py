"""From a validated multi-GPU scenario (one with ``cluster:``) to a ready expert-parallel engine."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from moesim.engine.build import apply_routing, expert_sizes, load_routing, map_columns, routing_note
from moesim.engine.expert_parallel import (
    ExpertParallelEngine,
    check_fits,
    ep_groups,
    home_gpus,
    placement_context,
    ring_allreduce_s,
)
from moesim.errors import InputError
from moesim.perf.predictor import Predictor
from moesim.policies.base import registry


@dataclass
class EpPrepared:
    """Everything an expert-parallel run needs, built and checked before it starts."""

    scenario: object
    trace: object
    trace_sha256: str | None
    topo: object
    groups: np.ndarray
    model_layers: list
    col_src: list
    engine: ExpertParallelEngine
    predictor: Predictor
    memory: dict
    steps: int
    rows_per_step: int
    routing_note: str
    notes: list
    initial_placement: object


def placed_bytes(placement, sizes) -> float:
    """Expert bytes of the fullest GPU of one EP group under ``placement`` (replicas counted),
    with each expert at its own size (:class:`~moesim.models.expert_sizes.ExpertSizes`)."""
    kb = np.asarray(sizes.key_bytes, dtype=np.float64).reshape(sizes.mult.shape)
    per_gpu = np.zeros(placement.num_gpus)
    for l in range(placement.num_layers):
        np.add.at(per_gpu, placement.slot_gpu[l].astype(np.int64), kb[l, placement.slot_expert[l].astype(np.int64)])
    return float(per_gpu.max())


def _policy(scenario, family: str, default: str):
    cfg = getattr(scenario.policies, family)
    if cfg is None:
        cfg = registry(family)[default].Config()
    return cfg


def prepare_ep(scenario, *, source: str = "scenario", record_timeline: bool = False, progress=None) -> EpPrepared:
    """Build and check an expert-parallel run of ``scenario``; InputError on bad input."""
    from moesim.network.topology import Topology
    from moesim.traces import check_trace_against_model

    m, hw, wl, rt = scenario.model, scenario.hardware, scenario.workload, scenario.runtime
    par = scenario.parallel
    if scenario.policies.cache.kind != "all_resident":
        raise InputError(
            "expert-parallel runs keep every expert resident on its GPUs; use all_resident "
            "(offloading inside an EP group is not modelled)",
            source=source,
            field="policies.cache.kind",
        )
    if scenario.policies.prefetch.kind != "none" or scenario.policies.execution.kind != "gpu_only":
        raise InputError(
            "prefetch and CPU execution are single-GPU policies; use prefetch none and execution gpu_only",
            source=source,
            field="policies",
        )
    topo = Topology.from_spec(scenario.cluster)
    G = topo.num_gpus
    t = par.attention_tp
    if t > topo.gpus_per_node:
        raise InputError(
            f"{t} is more than the {topo.gpus_per_node} GPUs of a node (attention TP stays inside a node)",
            source=source, field="parallel.attention_tp",
        )
    M = par.attention_gpus
    if M is not None and not 0 < M < G:
        raise InputError(f"{M} leaves no GPU for the experts of a {G}-GPU cluster", source=source,
                         field="parallel.attention_gpus")
    A = M if M is not None else G  # GPUs that run attention
    N = G - M if M is not None else G  # GPUs that hold experts
    if A % t:
        raise InputError(f"{t} does not divide the {A} attention GPUs", source=source, field="parallel.attention_tp")
    ep = par.ep or N
    if ep > N or N % ep:
        raise InputError(f"{ep} must divide the {N} GPUs that hold experts", source=source, field="parallel.ep")
    groups = ep_groups(N, ep, par.ep_layout) + (G - N)
    el = par.elastic
    if el is not None:
        if M is not None or par.ep is not None:
            raise InputError("elastic scaling works with one EP group over all active GPUs (no attention_gpus, "
                             "no ep)", source=source, field="parallel.elastic")
        end = el.end_gpus or G
        for fld, n in (("start_gpus", el.start_gpus), ("end_gpus", end)):
            if not t <= n <= G or n % t:
                raise InputError(f"{n} must be a multiple of attention_tp within the cluster's {G} GPUs",
                                 source=source, field=f"parallel.elastic.{fld}")
        if end == el.start_gpus:
            raise InputError("end_gpus equals start_gpus: nothing to scale", source=source,
                             field="parallel.elastic.end_gpus")
        if end < el.start_gpus and (t != 1 or par.micro_batches != 1):
            raise InputError("scale-down is modelled with attention_tp 1 and one micro-batch", source=source,
                             field="parallel.elastic")
        A_after = end
        groups_after = ep_groups(end, end, par.ep_layout)
        A = el.start_gpus
        groups = ep_groups(A, A, par.ep_layout)

    trace, sha = load_routing(scenario, source)
    tsrc = scenario.trace.path or source
    trace_layers = check_trace_against_model(
        trace, num_experts=m.num_experts, moe_layers=m.moe_layers, layers=scenario.trace.layers, source=tsrc,
    )
    trace_layers = tuple(int(x) for x in trace_layers)
    B = wl.batch_size
    R = (A // t) * B  # rows of one decode step: every data-parallel rank's batch
    routing = apply_routing(scenario, trace, source, step_rows=R)
    if routing is not None:
        trace = routing[0]
    model_layers, col_src, borrowed = map_columns(m, trace_layers)
    sizes = expert_sizes(scenario, routing, col_src, source)
    experts = np.asarray(trace.experts)
    T = experts.shape[0]
    R_after = R
    if el is not None and A_after > A:
        R_after = (A_after // t) * B  # scale-up: the new GPUs take new sequences
    rows = wl.max_tokens if wl.loop_trace else min(wl.max_tokens, T)
    if el is None:
        steps = rows // R
    else:
        steps = min(rows // R, el.at_step) + max(0, rows - el.at_step * R) // R_after
        if steps <= el.at_step:
            raise InputError(f"the run ends before step {el.at_step}: raise workload.max_tokens",
                             source=source, field="parallel.elastic.at_step")
    notes = []
    if steps < 1:
        raise InputError(
            f"one decode step needs {R} trace rows ({A // t} data-parallel ranks x batch {B}); "
            f"{'max_tokens is' if wl.loop_trace or wl.max_tokens < T else 'the trace has'} {rows} "
            f"(set workload.loop_trace: true to replay the trace)",
            source=source,
            field="workload.max_tokens",
        )
    if not wl.loop_trace and wl.max_tokens > T:
        notes.append(f"trace has {T} rows: the run stops after {steps} steps")
    if wl.loop_trace and steps * R > T:
        notes.append(f"trace of {T} rows replayed from its start ({steps * R} rows used)")
    warm = wl.warmup_tokens // R
    if warm >= steps:
        raise InputError(
            f"warm-up of {warm} steps leaves nothing to measure in {steps} steps",
            source=source, field="workload.warmup_tokens",
        )

    # placement from its profile window
    pl_cfg = _policy(scenario, "placement", "contiguous")
    a2a_cfg = _policy(scenario, "alltoall", "direct")
    placement_policy = registry("placement")[pl_cfg.kind](pl_cfg)

    if pl_cfg.profile == "warmup":
        if warm == 0:
            raise InputError(
                "profile: warmup needs warm-up steps (workload.warmup_tokens >= one step's rows)",
                source=source, field="policies.placement.profile",
            )
        prof_rows = np.arange(warm * R) % T
    else:
        prof_rows = np.arange(min(steps * R, T))
    ctx = placement_context(groups, topo.node_of, m.num_experts, m.expert_bytes, experts[prof_rows][:, col_src, :])
    try:
        placement = placement_policy.place(ctx)
        placement.validate()
    except ValueError as exc:
        raise InputError(str(exc), source=source, field="policies.placement") from None
    slots = int(placement.slots_per_gpu().max())
    memory = check_fits(scenario, slots_per_gpu=slots, steps=steps, source=source,
                        expert_bytes_per_gpu=None if sizes is None else placed_bytes(placement, sizes))
    if sizes is not None:
        memory["expert_sizes"] = sizes.summary()

    # stage times (attention and dense parts on the attention pool's GPU type when it differs)
    pred = Predictor(m, hw)
    pred_attn = pred
    if par.attention_hardware is not None:
        if M is None:
            raise InputError("attention_hardware needs attention_gpus (attention-FFN disaggregation)",
                             source=source, field="parallel.attention_hardware")
        from moesim.hardware.presets import load_hardware_preset
        from moesim.hardware.spec import HardwareSpec

        try:
            hw_attn = HardwareSpec.model_validate(load_hardware_preset(par.attention_hardware))
        except InputError as e:
            raise e.with_context(source=source) from None
        pred_attn = Predictor(m, hw_attn)
        g_a = hw_attn.gpu
        usable_a = (g_a.hbm_gib - g_a.reserved_gib) * 2**30
        need_a = memory["dense_bytes"] + memory["kv_bytes"]
        if need_a > usable_a:
            raise InputError(
                f"attention GPUs ({hw_attn.gpu.name}) need {need_a / 2**30:.2f} GiB (dense weights + KV), more "
                f"than their {usable_a / 2**30:.2f} GiB", source=source, field="parallel.attention_hardware")
    mb = par.micro_batches
    if mb > B:
        raise InputError(f"{mb} micro-batches need at least {mb} sequences per rank", source=source,
                         field="parallel.micro_batches")
    B_dp = -(-B // mb) * t  # tokens of one micro-batch of one attention rank (the larger half)
    gpn_bw = scenario.cluster.intra.gpu_bandwidth_gb_s * 1e9
    lat = scenario.cluster.intra.latency_us * 1e-6
    blocks_before, prev = [], -1
    for l in model_layers:
        blocks_before.append(list(range(prev + 1, l + 1)))
        prev = l
    tail_blocks = list(range(prev + 1, m.num_layers))
    kernels = rt.dense_kernels_per_layer if rt.launch_mode == "eager" else 1

    def stage_arrays(B_dp):
        """Per-GPU dense time before each MoE layer, the tail, and attention core by step."""
        act_bytes = B_dp * m.hidden_size * 2.0  # bf16 activations all-reduced after attention

        def block_s(b: int) -> float:
            return pred_attn.block_dense(b, B_dp, kernels).time_s / t + ring_allreduce_s(act_bytes, t, gpn_bw, lat)

        dense = np.array([sum(block_s(b) for b in blocks) for blocks in blocks_before])
        tail = sum(block_s(b) for b in tail_blocks) + pred_attn.head(B_dp, rt.head_kernels if rt.launch_mode == "eager" else 1).time_s / t
        core, _ = pred_attn.attention_core(B_dp, wl.context_tokens + np.arange(steps), flop_split=t,
                                           kv_split=m.kv_tp_shards(t))
        return dense, float(tail), (lambda s: float(core[s]))

    dense_s, tail_s, attention_core_at = stage_arrays(B_dp)

    n_max = int(max(R, R_after)) + 1
    texp, _ = pred.expert_times(np.arange(n_max), kernels=1)
    fixed = pred.expert_fixed_s(1)
    texp = np.where(np.arange(n_max) > 0, np.maximum(texp - fixed, 0.0), 0.0)
    size_tables = None
    if sizes is not None:  # one table per size class, the same shape as texp
        tabs = [pred.expert_times(np.arange(n_max), kernels=1, size=c)[0] for c in sizes.classes]
        tabs = [np.where(np.arange(n_max) > 0, np.maximum(t - fixed, 0.0), 0.0) for t in tabs]
        size_tables = (np.stack(tabs), sizes.class_of)

    a2a = registry("alltoall")[a2a_cfg.kind](a2a_cfg, topo, hidden_size=m.hidden_size)
    def split(n_ranks):
        j = np.tile(np.arange(B), n_ranks)
        return [np.flatnonzero(j * mb // B == k) for k in range(mb)] if (mb > 1 or M is not None) else None

    mb_rows = split(A // t)
    elastic = None
    if el is not None:
        elastic = {
            "at_step": el.at_step,
            "rows_before": R,
            "rows_per_step": R_after,
            "home": home_gpus(A_after, t, B),
            "groups": groups_after,
            "mb_rows": split(A_after // t),
            "planning_s": el.planning_ms * 1e-3,
        }
        if A_after < A:  # scale-down: the leaving GPUs' sequences go round robin to the others
            home = home_gpus(A, t, B)
            leave = home >= A_after
            home[leave] = np.arange(int(leave.sum())) % A_after
            per_gpu = -(-R // A_after)
            d_after, t_after, c_after = stage_arrays(per_gpu)
            kv_tok = m.kv_bytes_per_token
            elastic.update(home=home, mb_rows=None, dense_s=d_after, tail_s=t_after, context_rows=c_after,
                           kv_bytes_per_seq=lambda s: (wl.context_tokens + s) * kv_tok)
            # the remaining GPUs must hold the experts (at least their share) and the moved KV
            after = scenario.model_copy(update={"workload": wl.model_copy(update={"batch_size": per_gpu})})
            n_after = -(-m.num_experts // A_after)
            worst = None  # heterogeneous experts: each layer's largest n_after experts on one GPU
            if sizes is not None:
                kb = np.asarray(sizes.key_bytes, dtype=np.float64).reshape(sizes.mult.shape)
                worst = float(np.sort(kb, axis=1)[:, -n_after:].sum())
            check_fits(after, slots_per_gpu=n_after, steps=steps, source=source, expert_bytes_per_gpu=worst)
    engine = ExpertParallelEngine(
        topo=topo,
        experts=experts,
        rows_per_step=R,
        steps=steps,
        warmup_steps=warm,
        col_src=col_src,
        home=home_gpus(A, t, B),
        groups=groups,
        placement_policy=placement_policy,
        placement=placement,
        alltoall=a2a,
        dense_s=dense_s,
        tail_s=tail_s,
        expert_t=texp,
        expert_fixed_s=fixed,
        expert_bytes=m.expert_bytes,
        context_rows=attention_core_at,
        record_timeline=record_timeline,
        progress=progress,
        planning_s=pl_cfg.planning_ms * 1e-3,
        micro_batches=mb,
        mb_rows=mb_rows,
        attention_gpus=M,
        elastic=elastic,
        size_tables=size_tables,
    )

    note = routing_note(scenario, trace, trace_layers, borrowed, SimpleNamespace(notes=notes))
    return EpPrepared(
        scenario=scenario,
        trace=trace,
        trace_sha256=sha,
        topo=topo,
        groups=groups,
        model_layers=list(model_layers),
        col_src=list(col_src),
        engine=engine,
        predictor=pred,
        memory=memory,
        steps=steps,
        rows_per_step=R,
        routing_note=note,
        notes=notes,
        initial_placement=placement,
    )
