"""The settings of the runtime a planned configuration models (llama.cpp, Fiddler, kTransformers,
an offloading cache), so that a plan can be applied outside the simulator."""

from __future__ import annotations

GIB = 2**30

# what llama.cpp's --n-cpu-moe / --cpu-moe generate for each block (common/common.h,
# llm_ffn_exps_block_regex: "blk\\.%d" + "\\.ffn_(up|down|gate)_exps"; newer releases also match
# fused gate_up and "chexps" tensors)
EXPS = r"\.ffn_(up|down|gate)_exps"


def int_set_regex(values) -> str:
    """A regular expression matching exactly the given non-negative integers (decimal), grouped
    by all-but-last digit: ``0..23`` -> ``[0-9]|1[0-9]|2[0-3]``."""
    by_prefix: dict[str, list[int]] = {}
    for v in sorted(set(int(x) for x in values)):
        s = str(v)
        by_prefix.setdefault(s[:-1], []).append(int(s[-1]))
    parts = []
    for prefix, digits in by_prefix.items():
        parts.append(prefix + _digit_class(digits, leading=not prefix))
    return "|".join(parts)


def _digit_class(digits: list[int], leading: bool) -> str:
    if len(digits) == 1:
        return str(digits[0])
    runs, start, prev = [], digits[0], digits[0]
    for d in digits[1:] + [None]:
        if d is not None and d == prev + 1:
            prev = d
            continue
        runs.append(f"{start}-{prev}" if prev - start >= 2 else "".join(str(x) for x in range(start, prev + 1)))
        if d is not None:
            start = prev = d
    return "[" + "".join(runs) + "]"


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def runtime_settings(scenario) -> list[str]:
    """Lines naming the equivalent settings of the modelled runtime for ``scenario``'s policies."""
    from moesim.planner.space import slot_count

    m = scenario.model
    pol = scenario.policies
    L, E, eb = len(m.moe_layers), m.num_experts, m.expert_bytes
    cache, ex, pf = pol.cache, pol.execution.kind, pol.prefetch.kind
    out: list[str] = []
    exc = pol.execution
    if cache.kind == "all_resident" and ex == "llamacpp" and (exc.n_gpu_layers is not None or exc.override_tensors):
        return _layout_lines(scenario)
    if cache.kind == "all_resident":
        n = min(cache.cpu_moe_layers, L)
        on_gpu = (L - n) * E
        if n == 0:
            out.append("llama.cpp: -ngl 99 (every expert on the GPU, no --n-cpu-moe)")
        elif n >= L:
            out.append('llama.cpp: -ngl 99 --cpu-moe (the same as -ot "exps=CPU": every routed expert in host memory)')
        else:
            blocks = m.moe_layers[:n]
            out.append(f"llama.cpp: -ngl 99 --n-cpu-moe {blocks[-1] + 1}")
            out.append(f'  or: -ngl 99 -ot "blk\\.({int_set_regex(blocks)}){EXPS}=CPU"')
            if blocks[-1] + 1 != n:
                out.append(f"  (--n-cpu-moe counts blocks; the first {n} MoE layers end at block {blocks[-1]})")
        out.append(f"GPU holds {on_gpu} of {L * E} experts ({L - n} MoE layers) = {_gib(on_gpu * eb)}; "
                   f"host holds {n * E} = {_gib(n * E * eb)}")
        if n and ex not in ("llamacpp",):
            out.append(f"(execution {ex}: host-resident experts are not computed on the CPU as llama.cpp does)")
        return out
    if cache.kind == "streaming":
        out.append(f"no expert cache: every routed expert copied at every use ({cache.transient_buffers} transient "
                   f"buffers = {_gib(cache.transient_buffers * eb)}), as ZeRO-Inference / accelerate-style offloading; "
                   "llama.cpp has no equivalent (its placement is static)")
        return out
    slots = slot_count(scenario).slots_total()
    size = (f"{slots} expert slots = {_gib(slots * eb)} ({slots / L:.1f} per MoE layer, "
            f"{100 * slots / (L * E):.0f}% of all experts)")
    whole_layers = min(L, slots // E)
    if ex == "ktransformers":
        out.append("kTransformers: routed experts on the CPU (optimize rule: KTransformersExperts with "
                   f"generate_device cpu, generate_op KExpertsCPU), --cpu_infer {scenario.hardware.cpu.cores} "
                   "(the CPU's cores); attention, router and shared experts on the GPU")
        out.append('closest llama.cpp: -ngl 99 --cpu-moe (-ot "exps=CPU"; ggml does not overlap CPU experts with the GPU)')
    elif ex == "fiddler":
        out.append(f"Fiddler (infer.py --cpu-offload 1): the most popular experts on the GPU, {size}; "
                   "Fiddler fills the GPU memory left after the non-expert weights (calc_n_expert_on_gpu), so cap it "
                   "there; other experts run on the CPU")
        out.append(f"closest llama.cpp (whole layers only): -ngl 99 --n-cpu-moe "
                   f"{_ncm(m, L - whole_layers)} ({whole_layers} layers of experts on the GPU)")
    elif ex == "gpu_only":
        pf_txt = "" if pf == "none" else f", prefetch {pf}"
        out.append(f"GPU expert cache ({cache.kind}, loaded on demand{pf_txt}): {size}")
        per = slots // L
        out.append(f"per-layer form (Mixtral-offloading): offload_per_layer = {max(0, E - per)} "
                   f"({per} of {E} experts per layer cached)")
        out.append("llama.cpp has no dynamic expert cache: the nearest static split keeps "
                   f"{whole_layers} layers on the GPU (--n-cpu-moe {_ncm(m, L - whole_layers)})")
    else:
        out.append(f"execution {ex} with a {cache.kind} GPU expert cache of {size}")
    return out


def _layout_lines(scenario) -> list[str]:
    """The flags of a llama.cpp layout given by ``n_gpu_layers`` / ``override_tensors`` (and the
    cache's ``cpu_moe_layers``), and where it puts the weights."""
    from moesim.policies.execution.llamacpp import llamacpp_layout

    m = scenario.model
    exc = scenario.policies.execution
    lay = llamacpp_layout(scenario, list(m.moe_layers), "scenario")
    L, E, eb = len(m.moe_layers), m.num_experts, m.expert_bytes
    flags = [f"-ngl {99 if exc.n_gpu_layers is None else exc.n_gpu_layers}"]
    k = min(scenario.policies.cache.cpu_moe_layers, L)
    flags += [f'-ot "{o}"' for o in exc.override_tensors]
    if k:
        flags.append(f"--n-cpu-moe {m.moe_layers[k - 1] + 1}")
    out = ["llama.cpp: " + " ".join(flags)]
    if exc.n_gpu_layers is not None:
        order = ("the output layer first (llama.cpp since Dec 2025)" if lay.order == "output_first"
                 else "the last blocks first (llama.cpp before Dec 2025)")
        out.append(f"  {lay.offloaded()}, counting {order}: blocks 0-{lay.gpu_from - 1} and their KV cache on the CPU"
                   if lay.gpu_from else f"  {lay.offloaded()}, counting {order}")
    host = len(lay.host_expert_layers)
    out.append(f"GPU holds {(L - host) * E} of {L * E} experts ({L - host} MoE layers) = {_gib((L - host) * E * eb)}; "
               f"host holds {host * E} = {_gib(host * E * eb)}")
    return out


def _ncm(model, n_layers: int) -> int:
    """llama.cpp's --n-cpu-moe value that covers the first ``n_layers`` MoE layers (it counts blocks)."""
    if n_layers <= 0:
        return 0
    return model.moe_layers[n_layers - 1] + 1
