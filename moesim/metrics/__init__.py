"""Metrics: the one definition of every reported number (summary.json, timelines)."""

from moesim.metrics.summary import SCHEMA_VERSION, build_summary, percentiles

__all__ = ["SCHEMA_VERSION", "build_summary", "percentiles"]
