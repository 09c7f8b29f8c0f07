"""Topology graph and resource ids of a single-GPU machine."""

from __future__ import annotations

import networkx as nx

from moesim.hardware import HardwareSpec, build_topology, load_hardware_preset, resource_ids


def test_nodes_and_link_edge(tiny_hw):
    hw = HardwareSpec.model_validate(tiny_hw)
    g = build_topology(hw)
    assert set(g.nodes) == {"host0", "cpu0", "gpu0"}
    assert {n: g.nodes[n]["kind"] for n in g.nodes} == {"host0": "host", "cpu0": "cpu", "gpu0": "gpu"}
    assert g.nodes["gpu0"]["spec"] is hw.gpu and g.nodes["cpu0"]["spec"] is hw.cpu
    e = g.edges["host0", "gpu0"]
    assert e["id"] == "link.pcie0"
    assert e["h2d_bandwidth_gb_s"] == 20 and e["d2h_bandwidth_gb_s"] == 20
    assert nx.shortest_path(g, "cpu0", "gpu0") == ["cpu0", "host0", "gpu0"]


def test_resource_ids(tiny_hw):
    hw = HardwareSpec.model_validate(tiny_hw)
    assert resource_ids(hw) == ["gpu0.compute", "gpu0.h2d", "gpu0.d2h", "host0", "cpu0", "link.pcie0"]


def test_link_id_follows_link_name():
    hw = HardwareSpec.model_validate(load_hardware_preset("jetson-agx-orin"))
    assert resource_ids(hw)[-1] == "link.unified0"
    assert build_topology(hw).edges["host0", "gpu0"]["kind"] == "unified"
