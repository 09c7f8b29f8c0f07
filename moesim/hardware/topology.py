"""The machine as a graph: devices are nodes, links are edges (networkx).

A single-GPU machine has three nodes, ``host0`` (the host thread that drives the GPU, with host
DRAM), ``cpu0`` (the CPU cores that can run experts) and ``gpu0``, one edge ``host0``-``gpu0`` for
the host link (id ``link.<name>``, e.g. ``link.pcie0``) and one edge ``cpu0``-``host0`` for the DRAM
the cores read (id ``host0.dram``). Multi-GPU machines add GPU nodes, NVLink/NIC edges and switches;
routes are then shortest paths in this graph.
"""

from __future__ import annotations

import networkx as nx

from moesim.hardware.spec import HardwareSpec


def link_id(hw: HardwareSpec) -> str:
    """Resource id of the host link, ``link.<name>``."""
    return f"link.{hw.link.name}"


def build_topology(hw: HardwareSpec) -> nx.Graph:
    """Graph of ``hw``: nodes host0/cpu0/gpu0 (``kind``, ``spec``), edges with ``id`` and GB/s."""
    g = nx.Graph(name=hw.name)
    g.add_node("host0", kind="host", spec=hw.host, memory=hw.host_memory)
    g.add_node("cpu0", kind="cpu", spec=hw.cpu)
    g.add_node("gpu0", kind="gpu", spec=hw.gpu)
    link = hw.link
    g.add_edge(
        "host0",
        "gpu0",
        id=link_id(hw),
        kind=link.kind,
        spec=link,
        h2d_bandwidth_gb_s=link.h2d_bandwidth_gb_s,
        d2h_bandwidth_gb_s=link.d2h_bandwidth_gb_s,
        setup_us=link.setup_us,
        bidirectional_derate=link.bidirectional_derate,
    )
    g.add_edge(
        "cpu0",
        "host0",
        id="host0.dram",
        kind="memory",
        bandwidth_gb_s=hw.cpu.dram_bandwidth_gb_s,
    )
    return g


def resource_ids(hw: HardwareSpec) -> list[str]:
    """Ids of the simulated resources (used in timelines and ``utilization``), fixed order."""
    return ["gpu0.compute", "gpu0.h2d", "gpu0.d2h", "host0", "cpu0", link_id(hw)]
