"""Oracle next-layer prefetch: the upper bound of any cross-layer look-ahead."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moesim.policies.base import PolicyConfig
from moesim.policies.prefetch.base import PrefetchPolicy


class OracleNextLayer(PrefetchPolicy):
    """After layer l's router is read, load exactly the experts layers l+1 .. l+``lookahead`` will
    use (taken from the trace: an oracle). It bounds what gate look-ahead systems such as
    Pre-gated MoE (Hwang et al., ISCA 2024, arXiv:2308.12066) and AdapMoE (Zhong et al., ICCAD 2024,
    arXiv:2408.10284) can gain. It does not look past the step's last MoE layer: the next token is
    not sampled yet."""

    is_oracle = True

    class Config(PolicyConfig):
        """Oracle look-ahead over the next ``lookahead`` MoE layers of the same step."""

        kind: Literal["oracle_next_layer"] = "oracle_next_layer"
        lookahead: int = Field(default=1, ge=1)

    def plan(self, step, column, known):
        su = self.setup
        out = []
        for c2 in range(column + 1, min(column + 1 + self.config.lookahead, su.num_columns)):
            out.extend((c2, e) for e in su.true_row(step, c2))
        return out
