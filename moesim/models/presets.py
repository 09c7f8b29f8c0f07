"""Bundled model presets: one YAML file per model in ``moesim/models/presets/``.

A preset is a raw :class:`~moesim.models.spec.ModelSpec` mapping; a scenario names it with
``model: {preset: NAME}`` and may override any of its fields next to ``preset``.
"""

from __future__ import annotations

from importlib import resources

import yaml

from moesim.errors import InputError

_PACKAGE = "moesim.models"
_FOLDER = "presets"
_SUFFIX = ".yaml"


def _folder():
    return resources.files(_PACKAGE).joinpath(_FOLDER)


def list_model_presets() -> list[str]:
    """Names of the bundled model presets (file names without ``.yaml``), sorted."""
    return sorted(
        p.name[: -len(_SUFFIX)] for p in _folder().iterdir() if p.name.endswith(_SUFFIX)
    )


def load_model_preset(name: str) -> dict:
    """The raw mapping of model preset ``name`` (not validated; validate with ``ModelSpec``).

    Raises :class:`~moesim.errors.InputError` on field ``model.preset`` for an unknown name.
    """
    valid = list_model_presets()
    if name not in valid:
        raise InputError(
            f"unknown model preset {name!r}; valid: {', '.join(valid)}", field="model.preset"
        )
    text = _folder().joinpath(name + _SUFFIX).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict):  # pragma: no cover - guards a broken bundled file
        raise InputError(f"model preset {name!r} is not a mapping", field="model.preset")
    return data
