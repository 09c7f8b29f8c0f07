"""The prefetch-policy interface."""

from __future__ import annotations

from moesim.policies.base import Policy


class PrefetchPolicy(Policy):
    """Base of prefetch policies. After the host has read layer ``column``'s router output it asks
    ``plan`` which (column, expert) pairs to load ahead; the engine queues them on the same copy
    engine as demand loads and counts them issued / used / wasted."""

    family = "prefetch"

    def plan(self, step: int, column: int, known_experts, now_s: float) -> list[tuple[int, int]]:
        """(column, expert) pairs to prefetch, given what the host knows at ``now_s`` seconds."""
        return []
