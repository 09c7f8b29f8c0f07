"""Hardware: the spec schema, presets, link timing, topology graph and fitting from measurements."""

from moesim.hardware.fit import fit_h100, fit_report
from moesim.hardware.links import LinkModel
from moesim.hardware.presets import list_hardware_presets, load_hardware_preset
from moesim.hardware.spec import HardwareSpec
from moesim.hardware.topology import build_topology, resource_ids

__all__ = [
    "HardwareSpec",
    "LinkModel",
    "build_topology",
    "fit_h100",
    "fit_report",
    "list_hardware_presets",
    "load_hardware_preset",
    "resource_ids",
]
