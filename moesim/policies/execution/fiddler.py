"""Fiddler: run a missing expert on the CPU instead of copying its weights to the GPU."""

from __future__ import annotations

from typing import Literal

from moesim.policies.execution.base import ExecutionPolicy
from moesim.policies.execution.cpu_options import CpuExecConfig


class Fiddler(ExecutionPolicy):
    """Fiddler (Kamahori et al., 2024, arXiv:2402.07033): experts resident on the GPU run there;
    an expert that is not resident is computed on the CPU from host memory, and only its
    activations cross the link (hidden states down, results up) — no weight copy. The GPU's expert
    set is static: Fiddler places the most popular experts on the GPU from a profile, which moesim
    models as a cache whose ``warm_start`` fills it (use ``warm_start: popular``) and that CPU runs
    never change. In Fiddler the CPU experts run in the serving process's main thread, so the host
    is busy (``cpu_blocks_host``) while they compute; GPU experts launched before keep running.
    Fiddler's decision rule for larger batches (load the weights when that is faster than CPU
    compute) is the ``load_if_faster`` option: a miss with more tokens than ``max_cpu_tokens`` is
    loaded to the GPU instead."""

    uses_cpu = True
    cpu_blocks_host = True

    class Config(CpuExecConfig):
        """Missing experts on the CPU (up to ``max_cpu_tokens`` tokens each; more: load them)."""

        kind: Literal["fiddler"] = "fiddler"
        max_cpu_tokens: int | None = None

    def split(self, column, experts, counts, is_resident):
        cap = self.config.max_cpu_tokens
        return {
            e for e, n in zip(experts, counts)
            if not is_resident(e) and (cap is None or n <= cap)
        }
