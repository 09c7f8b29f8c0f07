"""Prefetch policies: what to load before it is asked for, and when the host can know it."""
