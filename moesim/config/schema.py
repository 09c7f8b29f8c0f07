"""The scenario: pydantic models of every block of a scenario YAML (DESIGN 3.2)."""

from __future__ import annotations

import functools
from typing import Annotated, Literal, Union

from pydantic import Field, create_model, model_validator

from moesim.config.base import StrictModel
from moesim.hardware.spec import HardwareSpec
from moesim.models.spec import ModelSpec
from moesim.policies.base import FAMILIES, registry
from moesim.serving.config import RequestsConfig
from moesim.traces.synthetic import SyntheticTraceConfig


class TraceConfig(StrictModel):
    """Where the routing comes from: a trace file, or a synthetic generator."""

    path: str | None = None
    synthetic: SyntheticTraceConfig | None = None
    layers: list[int] | None = Field(
        default=None, description="model MoE layer index of each trace column"
    )

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("give exactly one of trace.path or trace.synthetic")
        return self


class WorkloadConfig(StrictModel):
    """Batched decode workload: ``batch_size`` sequences decode one token per step."""

    batch_size: int = Field(default=1, ge=1)
    max_tokens: int = Field(default=256, ge=1, description="trace rows (token-steps) to replay")
    warmup_tokens: int = Field(default=0, ge=0, description="simulated but left out of metrics")
    loop_trace: bool = False
    context_tokens: int = Field(
        default=512, ge=0, description="context length of each sequence at the first decode step"
    )
    requests: RequestsConfig | None = Field(
        default=None,
        description="requests arriving over time (serving runs, see moesim.serving); None = the "
        "fixed-batch decode replay above",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.warmup_tokens >= self.max_tokens:
            raise ValueError("warmup_tokens must be smaller than max_tokens")
        return self


class RuntimeConfig(StrictModel):
    """How the serving runtime drives the GPU: these settings change answers several-fold."""

    wait_for_router: bool = Field(
        default=True,
        description="host reads each router output before issuing the layer's experts; false only "
        "when every expert is resident (device-side routing)",
    )
    launch_mode: Literal["eager", "graph", "fused"] = Field(
        default="eager",
        description="eager: one launch per kernel; graph: one CUDA-graph launch per dense part and "
        "per expert; fused: one grouped-GEMM launch for a layer's resident experts and one for its "
        "loaded experts",
    )
    host_memory: Literal["pinned", "pageable"] = "pinned"
    expert_store: Literal["auto", "dram", "ssd"] = Field(
        default="auto",
        description="where the experts' home copy lives: auto = host DRAM when they fit, else the "
        "hardware's storage (each load is then a flash read followed by the link copy)",
    )
    dense_weights: Literal["resident", "streamed"] = Field(
        default="resident",
        description="streamed: every stage's non-expert weights are copied from host memory before "
        "it runs, into a GPU double buffer, one stage ahead (ZeRO-Inference style)",
    )
    dense_kernels_per_layer: int = Field(
        default=12, ge=1, description="kernels of one block's non-expert part (eager launches)"
    )
    kernels_per_expert: int = Field(
        default=5, ge=1, description="kernels of one expert FFN in eager mode (3 GEMMs, act, mul)"
    )
    head_kernels: int = Field(default=4, ge=1, description="final norm, LM head, sampling kernels")
    dequant: Literal["free", "fused", "separate"] = Field(
        default="free",
        description="GPU cost of unpacking quantised expert weights (moesim.perf.dequant): free = the "
        "roofline over packed bytes; fused = unpacking arithmetic as a third roof; separate = an extra "
        "dequantise pass to 16-bit, then a 16-bit GEMM",
    )
    dequant_ops_per_weight: dict[str, float] = Field(
        default_factory=dict,
        description="override the assumed unpacking instructions per weight of a format, e.g. {hqq2: 4}",
    )

    @model_validator(mode="after")
    def _dequant_formats(self):
        from moesim.perf.dequant import DEQUANT_OPS_PER_WEIGHT

        bad = sorted(set(self.dequant_ops_per_weight) - set(DEQUANT_OPS_PER_WEIGHT))
        if bad:
            raise ValueError(f"dequant_ops_per_weight: unknown format {bad[0]!r}; known: {sorted(DEQUANT_OPS_PER_WEIGHT)}")
        if any(v < 0 for v in self.dequant_ops_per_weight.values()):
            raise ValueError("dequant_ops_per_weight values must be >= 0")
        return self


class ElasticConfig(StrictModel):
    """Scale an expert-parallel deployment up or down while it serves (ElasticMoE-style)."""

    start_gpus: int = Field(ge=1, description="GPUs 0..N-1 serve until at_step")
    end_gpus: int | None = Field(
        default=None, ge=1,
        description="GPUs 0..M-1 serve from at_step on (default: every GPU of the cluster); fewer than "
        "start_gpus = scale-down: the leaving GPUs' sequences move to the others with their KV caches",
    )
    at_step: int = Field(ge=1, description="decode step at which the new GPUs join")
    planning_ms: float = Field(default=0.0, ge=0, description="host time to plan the new placement")


class ParallelConfig(StrictModel):
    """How a multi-GPU run splits the model (used only with a ``cluster:`` block).

    ``workload.batch_size`` is the number of sequences of one data-parallel attention rank (one GPU,
    or one group of ``attention_tp`` GPUs); ``workload.max_tokens`` and ``warmup_tokens`` count
    trace rows, ``ranks x batch`` of them per decode step."""

    attention_tp: int = Field(default=1, ge=1, description="tensor-parallel GPUs per attention rank")
    ep: int | None = Field(
        default=None, ge=1, description="GPUs of one expert-parallel group (default: every GPU)"
    )
    micro_batches: int = Field(
        default=1, ge=1, le=8,
        description="2 = DeepSeek-V3's decode overlap: each GPU's batch split in two micro-batches whose "
        "all-to-all runs while the other's attention or experts compute (with attention_gpus: the "
        "ping-pong pipeline's micro-batches)",
    )
    elastic: ElasticConfig | None = Field(
        default=None,
        description="scale-up while serving: running sequences keep their GPUs, the new GPUs take new "
        "sequences, experts are re-placed and copied before each layer runs again",
    )
    prefill_gpus: int | None = Field(
        default=None, ge=1,
        description="disaggregated prefill/decode (serving runs, workload.requests): GPUs 0..N-1 prefill, "
        "the others decode; each request's KV cache moves between the pools over the links",
    )
    attention_hardware: str | None = Field(
        default=None,
        description="with attention_gpus: hardware preset of the attention pool's GPUs (a different "
        "GPU type from the expert pool's, which is `hardware`); None = the same",
    )
    gpu_cost_per_hour: float | None = Field(
        default=None, gt=0, description="price of one GPU-hour (expert pool / all GPUs), for tokens per dollar"
    )
    attention_gpu_cost_per_hour: float | None = Field(
        default=None, gt=0, description="with attention_gpus: price of one attention-pool GPU-hour"
    )
    attention_gpus: int | None = Field(
        default=None, ge=1,
        description="attention-FFN disaggregation (MegaScale-Infer): GPUs 0..N-1 run attention and the "
        "dense parts, the others only experts; tokens cross between the pools every MoE layer. "
        "None = every GPU does both",
    )
    ep_layout: Literal["folded", "strided"] = Field(
        default="folded",
        description="folded: each EP group is consecutive GPUs (MoE Parallel Folding, the EP group "
        "inside the NVLink domain when it fits); strided: EP ranks taken across the data-parallel "
        "dimension (every G/ep-th GPU), the layout when EP must be orthogonal to attention TP",
    )


@functools.lru_cache(maxsize=None)
def policies_model():
    """The ``policies`` block: one discriminated union on ``kind`` per family (built once, after
    every policy module is imported)."""
    fields = {}
    defaults = {
        "cache": "lru", "prefetch": "none", "execution": "gpu_only", "precision": "full", "routing": "none",
        "placement": "contiguous", "alltoall": "direct", "batching": "continuous",
    }
    for fam in FAMILIES:
        classes = registry(fam)
        configs = tuple(c.Config for c in classes.values())
        if len(configs) == 1:
            ann = configs[0]
        else:
            ann = Annotated[Union[configs], Field(discriminator="kind")]  # type: ignore[valid-type]
        if fam == "cache":
            fields[fam] = (ann, ...)
        elif fam in MULTI_GPU_FAMILIES or fam in SERVING_FAMILIES:
            fields[fam] = (ann | None, None)  # type: ignore[operator]
        else:
            fields[fam] = (ann, Field(default_factory=lambda f=fam: registry(f)[defaults[f]].Config()))
    return create_model("PoliciesConfig", __base__=StrictModel, **fields)


MULTI_GPU_FAMILIES = ("placement", "alltoall")  # None unless the scenario has a cluster
SERVING_FAMILIES = ("batching",)  # None unless the scenario has workload.requests


@functools.lru_cache(maxsize=None)
def scenario_model():
    """The whole scenario model (presets already merged into ``model``, ``hardware``, ``cluster``).

    ``cluster`` and ``parallel`` (and ``policies.placement`` / ``policies.alltoall``) are None in
    single-GPU scenarios and left out of the resolved scenario then, so they do not change the
    hash of scenarios that do not use them."""
    from moesim.network.cluster import ClusterSpec

    def _check(self):
        if self.workload.requests is None:
            if self.policies.batching is not None:
                raise ValueError("policies.batching needs workload.requests (a serving run)")
        else:
            if self.policies.batching is None:
                self.policies.batching = registry("batching")["continuous"].Config()
        if self.cluster is None:
            extra = [f for f in ("parallel",) if getattr(self, f) is not None]
            extra += [f"policies.{f}" for f in MULTI_GPU_FAMILIES if getattr(self.policies, f) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)} need a cluster: block (multi-GPU run)")
        elif self.parallel is None:
            self.parallel = ParallelConfig()
        return self

    return create_model(
        "Scenario",
        __base__=StrictModel,
        name=(str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.+-]+$")),
        description=(str, ""),
        seed=(int, Field(default=0, ge=0)),
        model=(ModelSpec, ...),
        hardware=(HardwareSpec, ...),
        trace=(TraceConfig, ...),
        policies=(policies_model(), ...),
        workload=(WorkloadConfig, Field(default_factory=WorkloadConfig)),
        runtime=(RuntimeConfig, Field(default_factory=RuntimeConfig)),
        cluster=(ClusterSpec | None, None),
        parallel=(ParallelConfig | None, None),
        __validators__={"_multi_gpu": model_validator(mode="after")(_check)},
    )

