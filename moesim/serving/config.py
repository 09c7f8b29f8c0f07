"""The ``workload.requests`` block: request arrivals, prompt and output lengths, KV memory, SLOs.

Without this block a run is the foundation's fixed-batch decode replay. With it, requests arrive
over simulated time and a batching policy (``policies.batching``) forms each engine step from them
(see :mod:`moesim.serving`).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from moesim.config.base import StrictModel


# ----- length distributions ------------------------------------------------------------------------
class FixedLength(StrictModel):
    """Every request has ``value`` tokens."""

    dist: Literal["fixed"] = "fixed"
    value: int = Field(ge=1)


class UniformLength(StrictModel):
    """Integer lengths uniform on ``[low, high]`` (both included)."""

    dist: Literal["uniform"] = "uniform"
    low: int = Field(ge=1)
    high: int = Field(ge=1)

    @model_validator(mode="after")
    def _order(self):
        if self.high < self.low:
            raise ValueError("high must be at least low")
        return self


class LognormalLength(StrictModel):
    """Lognormal lengths: ``median * exp(sigma * N(0, 1))``, rounded, clipped to ``[min, max]``
    (LLM prompt and output lengths are heavy-tailed; the Azure LLM inference traces fit this)."""

    dist: Literal["lognormal"] = "lognormal"
    median: float = Field(gt=0)
    sigma: float = Field(default=1.0, ge=0)
    min: int = Field(default=1, ge=1)
    max: int = Field(default=8192, ge=1)

    @model_validator(mode="after")
    def _order(self):
        if self.max < self.min:
            raise ValueError("max must be at least min")
        return self


LengthDist = Annotated[Union[FixedLength, UniformLength, LognormalLength], Field(discriminator="dist")]


def _length(v):
    """An integer is shorthand for ``{dist: fixed, value: N}``."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return {"dist": "fixed", "value": v}
    return v


# ----- arrival processes -----------------------------------------------------------------------------
class PoissonArrivals(StrictModel):
    """Poisson arrivals: exponential inter-arrival times of mean ``1 / rate_per_s``."""

    kind: Literal["poisson"] = "poisson"
    rate_per_s: float = Field(gt=0, allow_inf_nan=False)


class GammaArrivals(StrictModel):
    """Bursty arrivals: gamma inter-arrival times of mean ``1 / rate_per_s`` and coefficient of
    variation ``cv`` (shape ``1 / cv**2``; ``cv = 1`` is Poisson, larger is burstier)."""

    kind: Literal["gamma"] = "gamma"
    rate_per_s: float = Field(gt=0, allow_inf_nan=False)
    cv: float = Field(default=2.0, gt=0, allow_inf_nan=False)


class TraceArrivals(StrictModel):
    """Arrival times and prompt / output lengths read from a file: JSONL (one object per line) or
    CSV with a header. Columns (first match wins): time ``arrival_s`` | ``arrival_time`` |
    ``timestamp`` | ``TIMESTAMP`` (seconds, or a date-time string as in the Azure LLM inference
    traces); prompt ``prompt_tokens`` | ``input_tokens`` | ``ContextTokens``; output
    ``output_tokens`` | ``GeneratedTokens``. Times are taken relative to the first row and
    multiplied by ``time_scale`` (0.5 = the same requests twice as fast)."""

    kind: Literal["trace"] = "trace"
    path: str
    time_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    format: Literal["auto", "jsonl", "csv"] = "auto"


ArrivalConfig = Annotated[Union[PoissonArrivals, GammaArrivals, TraceArrivals], Field(discriminator="kind")]


class SloConfig(StrictModel):
    """Service-level objectives: a request meets them when its TTFT and its TPOT are within."""

    ttft_ms: float = Field(default=1000.0, gt=0)
    tpot_ms: float = Field(default=100.0, gt=0)


class RequestsConfig(StrictModel):
    """Requests arriving over time (the serving layer)."""

    arrival: ArrivalConfig
    num_requests: int | None = Field(
        default=None, ge=1, description="requests to generate (with duration_s: whichever ends first)"
    )
    duration_s: float | None = Field(default=None, gt=0, description="arrivals within [0, duration_s)")
    prompt_tokens: LengthDist = Field(default_factory=lambda: FixedLength(value=512))
    output_tokens: LengthDist = Field(default_factory=lambda: FixedLength(value=128))
    kv_policy: Literal["wait", "preempt"] = Field(
        default="preempt",
        description="KV memory full: wait = admit a request only when its whole KV (prompt + "
        "output) fits next to the reservations of those running; preempt = admit when its prompt "
        "fits, and when a step would exceed the budget pre-empt the youngest running request "
        "(its KV is freed and recomputed when it is re-admitted, as vLLM does)",
    )
    kv_block_tokens: int = Field(default=16, ge=1, description="KV is allocated in blocks of this many tokens (PagedAttention)")
    kv_cache_gib: float | None = Field(
        default=None, gt=0, description="cap on the KV budget (default: all GPU memory left over)"
    )
    warmup_requests: int = Field(default=0, ge=0, description="first requests left out of request metrics")
    slo: SloConfig = Field(default_factory=SloConfig)
    cluster_table_tokens: list[int] | None = Field(
        default=None,
        description="serving on a cluster without prefill_gpus (moesim.serving.ep_serving): tokens per "
        "attention rank at which the step-cost table is measured with the expert-parallel engine "
        "(interpolated between); None = 1, the powers of two and the largest step the batching policy "
        "can form; the largest step is always added",
    )
    routing_rows: Literal["auto", "by_request", "windows"] = Field(
        default="auto",
        description="which trace rows a request's tokens replay: by_request = the trace's request "
        "ids (prefill rows phase 0, then decode rows phase 1); windows = a seeded contiguous window "
        "of rows per request (the trace looped); auto = by_request when the trace has request and "
        "phase arrays",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            for k in ("prompt_tokens", "output_tokens"):
                if k in data:
                    data[k] = _length(data[k])
        return data

    @model_validator(mode="after")
    def _bounded(self):
        if self.arrival.kind != "trace" and self.num_requests is None and self.duration_s is None:
            raise ValueError("give num_requests or duration_s (or both) for a synthetic arrival process")
        if self.cluster_table_tokens is not None and (not self.cluster_table_tokens
                                                      or min(self.cluster_table_tokens) < 1):
            raise ValueError("cluster_table_tokens must list token counts of at least 1")
        if self.warmup_requests and self.num_requests is not None and self.warmup_requests >= self.num_requests:
            raise ValueError("warmup_requests must be smaller than num_requests")
        return self
