"""Every expert at the model's own expert precision."""

from __future__ import annotations

from typing import Literal

from moesim.policies.base import PolicyConfig
from moesim.policies.precision.base import PrecisionPolicy


class Full(PrecisionPolicy):
    """No precision change: every load is the model's ``expert_dtype`` (the default)."""

    class Config(PolicyConfig):
        """Full precision."""

        kind: Literal["full"] = "full"
