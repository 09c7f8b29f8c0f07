"""The execution-policy interface."""

from __future__ import annotations

from moesim.policies.base import Policy


class ExecutionPolicy(Policy):
    """Base of execution policies: decides the device each expert of a (step, layer) runs on.

    ``supports`` lists the devices the engine must provide for this policy."""

    family = "execution"
    devices: tuple[str, ...] = ("gpu",)
