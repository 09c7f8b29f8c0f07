"""Hardware presets: YAML files in ``moesim/hardware/presets/``, one machine each.

Each preset is a full :class:`moesim.hardware.spec.HardwareSpec` mapping with a ``sources`` entry
for every numeric field (spec sheet, measurement file, or stated assumption).
"""

from __future__ import annotations

from importlib import resources

import yaml

from moesim.errors import InputError

PRESET_PACKAGE = "moesim.hardware"
PRESET_DIR = "presets"


def _preset_files() -> dict:
    """Preset name -> resource handle of its YAML file."""
    folder = resources.files(PRESET_PACKAGE).joinpath(PRESET_DIR)
    return {
        entry.name[: -len(".yaml")]: entry
        for entry in folder.iterdir()
        if entry.is_file() and entry.name.endswith(".yaml")
    }


def list_hardware_presets() -> list[str]:
    """Names of the bundled hardware presets, sorted."""
    return sorted(_preset_files())


def load_hardware_preset(name: str) -> dict:
    """The raw mapping of hardware preset ``name`` (not yet validated); InputError if unknown."""
    files = _preset_files()
    if name not in files:
        raise InputError(
            f"unknown hardware preset '{name}'; valid: {', '.join(sorted(files))}",
            field="hardware.preset",
        )
    data = yaml.safe_load(files[name].read_text(encoding="utf-8"))
    if not isinstance(data, dict):  # pragma: no cover - guarded by the preset tests
        raise InputError("preset file is not a mapping", source=f"hardware preset {name}")
    return data
