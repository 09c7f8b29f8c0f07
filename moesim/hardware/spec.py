"""Hardware description: one host (CPU, DRAM, runtime costs), GPUs and the links between them.

Units live in field names: ``_gb_s`` = 1e9 bytes/s, ``_us`` = microseconds, ``_gib`` = 2**30 bytes,
``_tflops`` = 1e12 FLOP/s. Every preset carries a ``sources`` mapping from each numeric field's dotted
path to where the number comes from (spec sheet, measurement file, or stated assumption).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from moesim.config.base import StrictModel

GIB = 2**30
DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8", "int4", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0", "q3_k", "q2_k",
          "hqq3", "hqq2", "tq2_0", "tq1_0")


class PeakFlops(StrictModel):
    """Dense peak throughput per dtype in TFLOP/s (1e12 FLOP/s, without sparsity)."""

    fp32: float = Field(gt=0)
    bf16: float = Field(gt=0)
    fp16: float = Field(gt=0)
    fp8: float | None = Field(default=None, gt=0)
    int8: float | None = Field(default=None, gt=0)

    def for_dtype(self, dtype: str) -> float:
        """Peak TFLOP/s for ``dtype``; formats without native support fall back to bf16 math (the
        GGUF block formats and HQQ are dequantised to 16-bit and multiplied there; ternary weights
        meet int8 activations, as in BitNet b1.58 and MoTE)."""
        if dtype.startswith(("q", "hqq")):
            return self.bf16
        if dtype in ("int4", "int8", "tq2_0", "tq1_0"):
            return self.int8 or self.bf16
        if dtype == "fp8":
            return self.fp8 or self.bf16
        return float(getattr(self, dtype))


class CopyInterference(StrictModel):
    """Slow-down factors (>= 1) of GPU kernels while a host<->GPU copy runs concurrently."""

    memory_bound_slowdown: float = Field(default=1.0, ge=1.0)
    compute_bound_slowdown: float = Field(default=1.0, ge=1.0)


class GpuSpec(StrictModel):
    """One GPU: memory, peak throughput, efficiencies and fixed per-kernel GPU time."""

    name: str
    hbm_gib: float = Field(gt=0, description="device memory capacity, GiB")
    hbm_bandwidth_gb_s: float = Field(gt=0, description="peak device memory bandwidth, GB/s")
    peak_tflops: PeakFlops
    compute_efficiency: float = Field(default=0.7, gt=0, le=1.0)
    memory_efficiency: float = Field(default=0.8, gt=0, le=1.0)
    kernel_fixed_us: float = Field(default=2.0, ge=0, description="GPU-side fixed time per kernel")
    reserved_gib: float = Field(
        default=1.0, ge=0, description="memory taken by the runtime, workspace and activations"
    )
    unified_memory: bool = Field(default=False, description="GPU shares DRAM with the CPU (Jetson)")
    copy_interference: CopyInterference = Field(default_factory=CopyInterference)


class HostSpec(StrictModel):
    """Host-thread costs of driving the GPU (the host is an actor in the simulation)."""

    launch_us: float = Field(ge=0, description="host time to enqueue one kernel")
    eager_op_us: float | None = Field(
        default=None, ge=0,
        description="host time per op of a framework's eager call sequence (Python, dispatcher, output "
        "allocation and the launch), charged per kernel launched one by one (eager, fused); None = launch_us",
    )
    graph_launch_us: float = Field(ge=0, description="host time to launch one CUDA graph")
    copy_issue_us: float = Field(ge=0, description="host time to issue one async copy")
    router_readback_us: float = Field(
        ge=0, description="small device-to-host copy + synchronize, after the GPU result is ready"
    )

    @property
    def op_launch_us(self) -> float:
        """Host µs charged per kernel launched one by one: ``eager_op_us`` when set, else ``launch_us``."""
        return self.launch_us if self.eager_op_us is None else self.eager_op_us


class CpuUnitPeak(StrictModel):
    """Peak of one vector/matrix unit of ONE core in GFLOP/s (1e9 FLOP/s; int8: 1e9 ops/s) per
    dtype; a dtype left out runs at the unit's fp32 rate (bf16) or bf16 rate (int8)."""

    fp32: float | None = Field(default=None, gt=0)
    bf16: float | None = Field(default=None, gt=0)
    int8: float | None = Field(default=None, gt=0)

    def for_dtype(self, dtype: str) -> float | None:
        """Per-core GFLOP/s of this unit for expert weights of ``dtype`` (None: the unit cannot
        run it at all). Quantised formats are multiplied as bf16 after dequantisation; int8/int4
        use the int8 path when the unit has one."""
        if dtype in ("int8", "int4") and self.int8:
            return self.int8
        if dtype == "fp32":
            return self.fp32
        return self.bf16 or self.fp32


class CpuSpec(StrictModel):
    """Host CPU: cores, DRAM bandwidth and peak FLOP/s (all sockets together), and the detail that
    decides the speed of experts computed on it: NUMA nodes, DRAM channels, per-node and
    cross-socket bandwidth, a core's own bandwidth limit and per-core peaks of its vector/matrix
    units (see :mod:`moesim.perf.cpu`). Every detail field defaults to "not modelled", which keeps
    the aggregate model (all cores on one expert, the whole DRAM bandwidth)."""

    name: str
    sockets: int = Field(default=1, ge=1)
    cores_per_socket: int = Field(ge=1)
    dram_bandwidth_gb_s: float = Field(gt=0)
    peak_gflops_fp32: float = Field(gt=0)
    peak_gflops_bf16: float = Field(gt=0)
    compute_efficiency: float = Field(
        default=0.5, gt=0, le=1.0, description="achieved / peak FLOP/s of expert GEMMs (assumption)"
    )
    numa_nodes_per_socket: int = Field(
        default=1, ge=1, description="NUMA nodes per socket (SNC / NPS modes split a socket)"
    )
    dram_channels_per_socket: int | None = Field(default=None, ge=1, description="DRAM channels per socket")
    dram_mt_s: float | None = Field(default=None, gt=0, description="transfers/s of one channel, millions (8 B each)")
    node_bandwidth_gb_s: float | None = Field(
        default=None, gt=0,
        description="achievable DRAM read bandwidth of one NUMA node; None = dram_bandwidth_gb_s / nodes",
    )
    cross_socket_bandwidth_gb_s: float | None = Field(
        default=None, gt=0,
        description="rate at which one node's threads read another node's memory (UPI / Infinity "
        "Fabric); None = as fast as local memory (no NUMA penalty)",
    )
    core_bandwidth_gb_s: float | None = Field(
        default=None, gt=0,
        description="DRAM read rate one core can sustain on its own; None = no per-core limit",
    )
    units: dict[Literal["avx2", "avx512", "amx"], CpuUnitPeak] = Field(
        default_factory=dict, description="per-core peaks of the vector/matrix units the CPU has"
    )
    call_overhead_us: float | None = Field(
        default=None, ge=0,
        description="fixed host time of one CPU expert call (framework ops, thread-pool start and join), µs; "
        "None = 0",
    )
    weight_passes: dict[str, float] = Field(
        default_factory=dict,
        description="DRAM passes over an expert's weight bytes per CPU expert call, by expert dtype (a dtype "
        "left out: 1, the weights streamed once); > 1 when the framework re-lays the weights out every call",
    )
    overlap_compute_and_memory: bool = Field(
        default=True,
        description="true: a CPU expert takes max(arithmetic, DRAM) time (roofline); false: the two add "
        "(weight streaming and arithmetic do not overlap)",
    )

    @field_validator("weight_passes")
    @classmethod
    def _passes_known(cls, v):
        for dt, p in v.items():
            if dt not in DTYPES:
                raise ValueError(f"weight_passes: unknown dtype {dt!r}; known: {', '.join(DTYPES)}")
            if not p >= 1.0:
                raise ValueError(f"weight_passes[{dt}] must be >= 1 (got {p})")
        return v

    def passes(self, dtype: str) -> float:
        """DRAM passes over the weights of one CPU expert call with ``dtype`` weights (default 1)."""
        return float(self.weight_passes.get(dtype, 1.0))

    @field_validator("units")
    @classmethod
    def _units_have_a_rate(cls, v):
        for name, u in v.items():
            if u.fp32 is None and u.bf16 is None and u.int8 is None:
                raise ValueError(f"unit {name!r} needs at least one of fp32, bf16, int8")
        return v

    @model_validator(mode="after")
    def _check_bandwidths(self):
        """Cross-field checks: node bandwidths add up to no more than the DRAM total, which is
        no more than the channels' peak; every NUMA node has at least one core."""
        nodes = self.numa_nodes
        if self.numa_nodes_per_socket > self.cores_per_socket:
            raise ValueError(
                f"numa_nodes_per_socket {self.numa_nodes_per_socket} exceeds cores_per_socket "
                f"{self.cores_per_socket} (a NUMA node without a core is not modelled)"
            )
        if self.node_bandwidth_gb_s is not None and self.node_bandwidth_gb_s * nodes > self.dram_bandwidth_gb_s * (1 + 1e-9):
            raise ValueError(
                f"node_bandwidth_gb_s {self.node_bandwidth_gb_s} x {nodes} NUMA nodes exceeds "
                f"dram_bandwidth_gb_s {self.dram_bandwidth_gb_s}"
            )
        peak = self.dram_peak_gb_s
        if peak is not None and self.dram_bandwidth_gb_s > peak * (1 + 1e-9):
            raise ValueError(
                f"dram_bandwidth_gb_s {self.dram_bandwidth_gb_s} exceeds the channels' peak {peak:.1f} "
                f"({self.sockets} x {self.dram_channels_per_socket} channels x 8 B x {self.dram_mt_s} MT/s)"
            )
        return self

    @property
    def cores(self) -> int:
        """Total cores over all sockets."""
        return self.sockets * self.cores_per_socket

    @property
    def numa_nodes(self) -> int:
        """NUMA nodes over all sockets."""
        return self.sockets * self.numa_nodes_per_socket

    @property
    def cores_per_node(self) -> int:
        """Cores of one NUMA node (a socket's cores split evenly over its nodes)."""
        return max(1, self.cores_per_socket // self.numa_nodes_per_socket)

    @property
    def node_bandwidth(self) -> float:
        """DRAM bandwidth of one NUMA node, GB/s."""
        return self.node_bandwidth_gb_s or self.dram_bandwidth_gb_s / self.numa_nodes

    @property
    def dram_peak_gb_s(self) -> float | None:
        """Peak DRAM bandwidth of all channels, GB/s (None when channels or rate are unknown)."""
        if self.dram_channels_per_socket is None or self.dram_mt_s is None:
            return None
        return self.sockets * self.dram_channels_per_socket * 8.0 * self.dram_mt_s / 1000.0


class HostMemorySpec(StrictModel):
    """Host DRAM: capacity and the bandwidth of pageable (non-pinned) copies by size.

    The pageable tables give the rate a copy of that size runs at *after* the link's fixed
    ``setup_us`` (duration = setup + bytes / rate; see :class:`moesim.hardware.links.LinkModel`).
    """

    capacity_gib: float = Field(gt=0)
    pinned_capacity_gib: float | None = Field(
        default=None, ge=0,
        description="how much of the experts' home copy may be pinned (page-locked); the rest lives in "
        "pageable DRAM, and what DRAM cannot hold on storage (moesim.hardware.tiers). None = all of it",
    )
    pageable_h2d_gb_s: list[tuple[float, float]] = Field(
        description="[[size_bytes, GB/s], ...] increasing sizes; interpolated log-log (power law)"
    )
    pageable_d2h_gb_s: list[tuple[float, float]] | None = Field(
        default=None,
        description="like pageable_h2d_gb_s for device->host copies; None = use the h2d table",
    )

    @field_validator("pageable_h2d_gb_s", "pageable_d2h_gb_s")
    @classmethod
    def _check_table(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("needs at least one [size_bytes, GB/s] row")
        sizes = [r[0] for r in v]
        if any(s <= 0 for s in sizes) or any(b <= 0 for _, b in v):
            raise ValueError("sizes and bandwidths must be positive")
        if sizes != sorted(sizes) or len(set(sizes)) != len(sizes):
            raise ValueError("sizes must be strictly increasing")
        return v


class LinkSpec(StrictModel):
    """A host<->GPU link (PCIe, or the memory bus of a unified-memory SoC)."""

    name: str = "pcie0"
    kind: Literal["pcie", "unified", "nvlink-c2c"] = "pcie"
    generation: int | None = Field(default=None, ge=1)
    width: int | None = Field(default=None, ge=1)
    h2d_bandwidth_gb_s: float = Field(gt=0, description="pinned host->device rate, one direction")
    d2h_bandwidth_gb_s: float = Field(gt=0, description="pinned device->host rate, one direction")
    setup_us: float = Field(ge=0, description="fixed cost per transfer (DMA set-up, latency)")
    bidirectional_derate: float = Field(
        default=1.0, gt=0, le=1.0, description="fraction of the one-way rate each direction keeps when both run"
    )


class StorageSpec(StrictModel):
    """Flash storage (NVMe SSD, eMMC/UFS) holding experts that do not fit in host DRAM."""

    name: str = "ssd0"
    read_gb_s: float = Field(gt=0, description="sustained large-read bandwidth")
    latency_us: float = Field(ge=0, description="fixed cost per read request")
    capacity_gib: float = Field(gt=0)
    gpudirect: bool = Field(
        default=False, description="reads go straight to GPU memory (GPUDirect Storage), not via DRAM"
    )


class HardwareSpec(StrictModel):
    """A machine: one host with its CPU, DRAM and runtime costs, one GPU, one host link."""

    name: str
    description: str = ""
    gpu: GpuSpec
    host: HostSpec
    cpu: CpuSpec
    host_memory: HostMemorySpec
    link: LinkSpec
    storage: StorageSpec | None = None
    expert_profile: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.+-]+$",
        description="name of a measured expert-time table in moesim/perf/tables (a name, not a path)",
    )
    cpu_expert_profile: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.+-]+$",
        description="name of a measured CPU expert-time table in moesim/perf/tables (a name, not a path)",
    )
    sources: dict[str, str] = Field(default_factory=dict)

