"""The precision-policy interface.

For every *missing* expert of a (step, layer) the policy chooses ``"full"`` (load the model's
expert dtype), ``"low"`` (load a lower-precision copy: fewer bytes over the link, its own kernel
time, a smaller cache entry) or ``"skip"`` (drop the expert's contribution: no load, no kernel).
Resident experts run at the precision they were loaded with. The engine reports the gate mass
served at low precision and skipped, a quality proxy, in ``summary.json``.
"""

from __future__ import annotations

from moesim.policies.base import Policy


class PrecisionPolicy(Policy):
    """Base of precision policies."""

    family = "precision"
    low_dtype: str | None = None  # the lower-precision format this policy may load

    def __init__(self, config, setup=None):
        super().__init__(config)
        self.setup = setup

    def decide(self, column: int, expert: int, weight: float) -> str:
        """``"full"``, ``"low"`` or ``"skip"`` for a missing expert with mean gate ``weight``."""
        return "full"
