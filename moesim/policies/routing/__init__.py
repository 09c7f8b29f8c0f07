"""Routing policies: transforms of the trace's routing (model-side variants of MoE routing)."""
