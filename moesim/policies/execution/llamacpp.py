"""llama.cpp-style static CPU/GPU layout: experts not in GPU memory are computed on the CPU."""

from __future__ import annotations

from typing import Literal

from moesim.policies.execution.base import ExecutionPolicy
from moesim.policies.execution.cpu_options import CpuExecConfig


class LlamaCpp(ExecutionPolicy):
    """llama.cpp (ggml) hybrid execution with ``--n-cpu-moe N`` / ``-ot`` tensor overrides: the
    expert tensors a user keeps in host memory are computed there by the CPU backend, everything
    else on the GPU; nothing moves between the two at run time except activations. ggml runs the
    graph's backend splits one after another, so the GPU waits while the CPU computes and the host
    thread drives the CPU work (``cpu_blocks_host``). The layout itself is the cache's: use
    ``policies.cache: {kind: all_resident, cpu_moe_layers: N}`` for ``--n-cpu-moe N``. Left out:
    ggml's quantised CPU kernels (CPU time comes from the CPU table/roofline at the model's expert
    dtype) and its graph-split overheads."""

    uses_cpu = True
    cpu_blocks_host = True

    class Config(CpuExecConfig):
        """Non-resident experts run on the CPU backend."""

        kind: Literal["llamacpp"] = "llamacpp"

    def split(self, column, experts, counts, is_resident):
        return {e for e in experts if not is_resident(e)}
