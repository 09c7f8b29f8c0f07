"""The trace's routing, unchanged."""

from __future__ import annotations

from typing import Literal

from moesim.policies.base import PolicyConfig
from moesim.policies.routing.base import RoutingPolicy


class NoRouting(RoutingPolicy):
    """Replay the trace's routing as it is (the default)."""

    class Config(PolicyConfig):
        """Unchanged routing."""

        kind: Literal["none"] = "none"
