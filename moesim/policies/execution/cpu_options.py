"""Config fields shared by the execution policies that compute experts on the host CPU."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moesim.policies.base import PolicyConfig


class CpuExecConfig(PolicyConfig):
    """How CPU experts are computed (see :mod:`moesim.perf.cpu`). The defaults keep the aggregate
    model: all cores on one expert at a time, the CPU's aggregate peak, the whole DRAM bandwidth
    (the measured CPU table where it matches)."""

    threads_per_expert: int | None = Field(
        default=None, ge=1,
        description="threads computing one expert; cores // threads experts run at once; None = all cores, one at a time",
    )
    cpu_unit: Literal["auto", "avx2", "avx512", "amx"] = Field(
        default="auto", description="vector/matrix unit of the CPU kernels (hardware.cpu.units); auto = aggregate peak"
    )
    numa_placement: Literal["interleave", "node_local", "node_sharded"] = Field(
        default="interleave", description="where expert weights live over the NUMA nodes"
    )

    def detailed_cpu(self) -> bool:
        """Whether any CPU detail differs from the aggregate model."""
        return self.threads_per_expert is not None or self.cpu_unit != "auto" or self.numa_placement != "interleave"
