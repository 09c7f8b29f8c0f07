"""Scenario configuration: pydantic models, YAML loading with include and --set, hashing."""

from moesim.config.loader import (
    apply_overrides,
    load_scenario,
    resolved_dict,
    scenario_from_dict,
    scenario_hash,
)

__all__ = ["apply_overrides", "load_scenario", "resolved_dict", "scenario_from_dict", "scenario_hash"]
