"""Policies, one family per folder, one file per policy; each registers itself by ``kind``."""

from moesim.policies.base import Policy, PolicyConfig, load_all_policies, registry

__all__ = ["Policy", "PolicyConfig", "load_all_policies", "registry"]
