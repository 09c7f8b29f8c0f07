"""kTransformers: routed experts on the CPU, attention and shared experts on the GPU."""

from __future__ import annotations

from typing import Literal

from moesim.policies.execution.base import ExecutionPolicy
from moesim.policies.execution.cpu_options import CpuExecConfig


class KTransformers(ExecutionPolicy):
    """kTransformers (Chen et al., SOSP 2025, "KTransformers: Unleashing the Full Potential of
    CPU/GPU Hybrid Inference for MoE Models"): every routed expert runs on the CPU (AMX/AVX-512
    kernels, in worker threads that overlap the GPU), while attention, the router and shared
    experts stay on the GPU. moesim leaves out its NUMA-aware weight placement and its expert
    deferral (starting the next layer before the last experts finish); the GPU keeps no routed
    expert, so pair it with a small cache (it is never consulted)."""

    uses_cpu = True
    cpu_blocks_host = False

    class Config(CpuExecConfig):
        """All routed experts on the CPU."""

        kind: Literal["ktransformers"] = "ktransformers"

    def split(self, column, experts, counts, is_resident):
        return set(experts)
