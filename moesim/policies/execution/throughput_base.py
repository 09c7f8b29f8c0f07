"""Base of the throughput-oriented offloading systems (MoE-Lightning, Klotski, MoE-Gen).

Such a policy is an execution kind that runs in the throughput engine
(:mod:`moesim.engine.throughput`) instead of the single-GPU decode engine: it decides the whole
step schedule (batching, where attention runs, which weights are copied when) and writes it as a
DAG of ops through the :class:`~moesim.engine.throughput.ThroughputContext` it is given. The
scenario's ``policies.cache`` must be ``streaming`` (the system streams weights itself).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from moesim.policies.base import PolicyConfig
from moesim.policies.execution.base import ExecutionPolicy


class ThroughputConfig(PolicyConfig):
    """Run length shared by the throughput systems (decode steps of every sequence)."""

    decode_steps: int = Field(default=4, ge=1, description="decode steps; every sequence makes one token per step")
    warmup_steps: int = Field(default=1, ge=0, description="first steps (pipeline fill) left out of the metrics")

    @model_validator(mode="after")
    def _check_steps(self):
        if self.warmup_steps >= self.decode_steps:
            raise ValueError("warmup_steps must be smaller than decode_steps")
        return self


class ThroughputExecution(ExecutionPolicy):
    """Base of the throughput systems: ``build(ctx)`` writes the run's schedule."""

    throughput_engine = True

    def build(self, ctx) -> None:
        """Fix the run size (``ctx.set_run``), check memory (``ctx.check_memory``) and add every op
        to ``ctx.dag``; record expert accesses (``ctx.record``) and a report (``ctx.info``)."""
        raise NotImplementedError


class LayerBuffers:
    """Bookkeeping of the GPU weight buffers that blocks are streamed into: block ``g`` (global
    index ``step * num_layers + block``) reuses the buffer of block ``g - buffers``, so a copy into
    it waits for that block's last GPU op."""

    def __init__(self, buffers: int = 2):
        self.buffers = buffers
        self.last_gpu: dict = {}  # global block -> id of its last GPU op

    def free_dep(self, g: int):
        """The op a copy of block ``g``'s weights must wait for (None: the buffer was never used)."""
        return self.last_gpu.get(g - self.buffers)

    def done(self, g: int, op: int) -> None:
        """Record ``op`` as the latest GPU op of block ``g``."""
        self.last_gpu[g] = op
