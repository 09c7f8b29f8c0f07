"""HOBBIT's mixed-precision expert loading: unimportant misses load a low-precision copy or skip."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moesim.policies.base import PolicyConfig
from moesim.policies.precision.base import PrecisionPolicy


class Hobbit(PrecisionPolicy):
    """HOBBIT (Tang et al., 2024, arXiv:2411.01433): on a cache miss, an expert whose gate score
    is low contributes little to the output, so HOBBIT loads a low-precision copy of it (int4 in
    place of fp16 in the paper) and may skip the least important ones, cutting bytes on the link.
    moesim compares the mean gate weight of the step's tokens routed to the expert with two
    thresholds (choices the paper leaves to tuning): below ``skip_threshold`` skip, below
    ``low_threshold`` load ``low_dtype``; otherwise full precision. A low-precision copy stays
    resident at that precision until evicted (HOBBIT's later upgrade of hot low-precision experts is
    not modelled). Traces without gate weights count each token as weight 1/top_k."""

    class Config(PolicyConfig):
        """Gate-weight thresholds for low-precision loads and skips."""

        kind: Literal["hobbit"] = "hobbit"
        low_dtype: Literal["int8", "fp8", "int4", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0", "q3_k", "q2_k", "hqq3",
                           "hqq2", "tq2_0", "tq1_0"] = "int4"
        low_threshold: float = Field(default=0.4, ge=0.0, le=1.0)
        skip_threshold: float = Field(default=0.0, ge=0.0, le=1.0)

        @model_validator(mode="after")
        def _order(self):
            if self.skip_threshold > self.low_threshold:
                raise ValueError("skip_threshold must not exceed low_threshold")
            return self

    def __init__(self, config, setup=None):
        super().__init__(config, setup)
        self.low_dtype = config.low_dtype

    def decide(self, column, expert, weight):
        c = self.config
        if weight < c.skip_threshold:
            return "skip"
        if weight < c.low_threshold:
            return "low"
        return "full"
