"""Every expert runs on the GPU; a missing expert is loaded on demand first."""

from __future__ import annotations

from typing import Literal

from moesim.policies.base import PolicyConfig
from moesim.policies.execution.base import ExecutionPolicy


class GpuOnly(ExecutionPolicy):
    """GPU-only execution with load on demand: the host copies a missing expert over the link and the
    expert's kernel waits for that copy (the execution model of Mixtral-offloading, MoE-Infinity and
    most offloading runtimes)."""

    class Config(PolicyConfig):
        """GPU only."""

        kind: Literal["gpu_only"] = "gpu_only"
