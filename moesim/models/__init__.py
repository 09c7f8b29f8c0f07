"""MoE model descriptions (:class:`ModelSpec`) and the bundled model presets."""

from moesim.models.presets import list_model_presets, load_model_preset
from moesim.models.spec import AttentionSpec, ModelSpec

__all__ = ["AttentionSpec", "ModelSpec", "list_model_presets", "load_model_preset"]
