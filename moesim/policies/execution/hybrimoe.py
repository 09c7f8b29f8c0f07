"""HybriMoE: a per-layer CPU/GPU split of the missing experts, decided by a greedy timeline."""

from __future__ import annotations

from typing import Literal

from moesim.policies.execution.base import ExecutionPolicy
from moesim.policies.execution.cpu_options import CpuExecConfig


def plan_layer(hit_loads, miss_loads, gpu_t, cpu_t, copy_s, act_s=0.0):
    """Greedy split of one layer's missing experts (HybriMoE's dynamic intra-layer scheduling).

    ``hit_loads`` / ``miss_loads``: token counts of resident and missing experts; ``gpu_t[n]`` /
    ``cpu_t[n]``: one expert's time with n tokens on GPU / CPU; ``copy_s``: one expert's weight
    copy; ``act_s``: activation round trip paid once when any expert runs on the CPU.
    The GPU runs resident experts first, high load first; the link moves missing experts highest
    load first, each running on the GPU after its copy; the CPU takes missing experts lowest load
    first. Each missing expert goes where it would finish earlier. The greedy plan is compared with
    the two pure plans (every miss on the CPU; every miss loaded) and the plan with the smallest
    estimated makespan wins, so the split is never estimated slower than either.
    Returns (set of miss indices on the CPU, estimated makespan in seconds).
    """
    gpu_free = sum(gpu_t[n] for n in hit_loads)
    order = sorted(range(len(miss_loads)), key=lambda i: -miss_loads[i])

    def makespan(cpu_idx):
        g, link, cpu = gpu_free, 0.0, act_s if cpu_idx else 0.0
        for i in order:  # loads: highest load first
            if i not in cpu_idx:
                link += copy_s
                g = max(g, link) + gpu_t[miss_loads[i]]
        for i in sorted(cpu_idx, key=lambda i: miss_loads[i]):  # CPU: lowest load first
            cpu += cpu_t[miss_loads[i]]
        return max(g, cpu)

    # greedy: walk misses from highest load; put each where it finishes first
    g, link, cpu = gpu_free, 0.0, 0.0
    greedy = set()
    for i in order:
        n = miss_loads[i]
        g_fin = max(g, link + copy_s) + gpu_t[n]
        c_fin = cpu + (act_s if not greedy else 0.0) + cpu_t[n]
        if c_fin < g_fin:
            greedy.add(i)
            cpu = c_fin
        else:
            link += copy_s
            g = g_fin
    candidates = [set(), set(range(len(miss_loads))), greedy]
    best = min(candidates, key=makespan)
    return best, makespan(best)


class HybriMoE(ExecutionPolicy):
    """HybriMoE (Zhong et al., DAC 2025, arXiv:2504.05897) dynamic intra-layer CPU/GPU scheduling:
    resident experts run on the GPU (high load first), missing ones are split between loading over
    the link (highest load first) and computing on the CPU (lowest load first) by a greedy
    timeline estimate made per layer when the router output is known (:func:`plan_layer`). CPU
    work runs in worker threads that overlap the GPU. Pair it with the ``hybrimoe_mrs`` cache for
    the full system. The estimate starts every layer from idle resources; what is left over from
    earlier layers is not in it (a simplification)."""

    uses_cpu = True
    cpu_blocks_host = False

    class Config(CpuExecConfig):
        """Greedy per-layer split of missing experts between the link and the CPU."""

        kind: Literal["hybrimoe"] = "hybrimoe"

    def bind_costs(self, *, gpu_t, cpu_t, copy_s, act_s):
        """Per-expert costs the split is estimated with (seconds; lists indexed by tokens)."""
        self.gpu_t, self.cpu_t, self.copy_s, self.act_s = gpu_t, cpu_t, copy_s, act_s

    def split(self, column, experts, counts, is_resident):
        hits, miss, miss_e = [], [], []
        for e, n in zip(experts, counts):
            if is_resident(e):
                hits.append(n)
            else:
                miss.append(n)
                miss_e.append(e)
        if not miss:
            return set()
        cpu_idx, _ = plan_layer(hits, miss, self.gpu_t, self.cpu_t, self.copy_s, self.act_s)
        return {miss_e[i] for i in cpu_idx}
