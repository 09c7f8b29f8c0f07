"""Memory tiers of the experts' home copies: pinned DRAM, pageable DRAM, storage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.hardware.tiers import assign_tiers, popularity
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "mixtral-8x7b-rtx4090-tiers-pinned16-dram64.yaml"
SHORT = ["workload.max_tokens=64", "workload.warmup_tokens=4"]


def run(*sets, timeline=False):
    return simulate(load_scenario(SC, [*SHORT, *sets]), record_timeline=timeline)


def test_bytes_per_tier_are_loads_per_tier_times_expert_bytes():
    out = run(timeline=True)
    s, tl = out.summary, out.result.timeline
    eb = s["transfers"]["expert_bytes"]
    tiers = s["transfers"]["by_tier"]
    for name in ("pinned", "pageable", "ssd"):
        assert tiers[name]["bytes"] == tiers[name]["loads"] * eb
        assert tiers[name]["loads"] > 0
    assert sum(t["loads"] for t in tiers.values()) == s["transfers"]["copies"]
    # a model larger than DRAM: the overflow streams from the SSD, read before each copy
    assert s["memory"]["expert_store"] == "dram+ssd"
    assert s["transfers"]["bytes_ssd"] == tiers["ssd"]["bytes"]
    mem = s["memory"]["tiers"]
    assert mem["ssd"]["bytes"] > 0 and mem["pinned"]["bytes"] <= 16 * 2**30
    assert mem["pinned"]["bytes"] + mem["pageable"]["bytes"] <= 64 * 2**30
    assert sum(t["experts"] for t in mem.values()) == 32 * 8
    # each copy's duration follows its tier: pinned rate, pageable table, pinned after a flash read
    link = out.prepared.engine.copy_time
    tier_of = out.prepared.engine.tiers
    E = 8
    reads = {(r[4], r[5], r[6]) for r in tl if r[1] == "ssd_read"}
    layer_col = {lay: c for c, lay in enumerate(out.prepared.model_layers)}
    for r in tl:
        if r[0] != "gpu0.h2d":
            continue
        t = tier_of[layer_col[r[5]] * E + r[6]]
        assert r[3] - r[2] == pytest.approx(link(eb, t != 1))
        assert ((r[4], r[5], r[6]) in reads) == (t == 2)


def test_pageable_copies_block_the_host():
    out = run(timeline=True)
    tl = out.result.timeline
    tier_of, E = out.prepared.engine.tiers, 8
    layer_col = {lay: c for c, lay in enumerate(out.prepared.model_layers)}
    launches = sorted((r[2], r[3]) for r in tl if r[0] == "host0" and r[1] == "launch")
    for r in tl:
        if r[0] == "gpu0.h2d" and tier_of[layer_col[r[5]] * E + r[6]] == 1:
            # the host issues nothing while a pageable copy runs
            assert not any(r[2] + 1e-12 < h0 < r[3] - 1e-12 for h0, _ in launches)


def test_pinned_capacity_covering_the_model_is_todays_run():
    base = ["hardware.host_memory.capacity_gib=128", "hardware.host_memory.pinned_capacity_gib=null"]
    today = run(*base).summary
    tiered = run(*base[:1], "hardware.host_memory.pinned_capacity_gib=100").summary
    for k in ("tpot_ms", "cache", "per_layer", "critical_path_ms", "utilization", "precision"):
        assert today[k] == tiered[k], k
    a, b = dict(today["transfers"]), dict(tiered["transfers"])
    assert b.pop("by_tier") == {"pinned": {"loads": a["copies"], "bytes": a["bytes_h2d_experts"]},
                                "pageable": {"loads": 0, "bytes": 0}, "ssd": {"loads": 0, "bytes": 0}}
    a.pop("by_tier")
    assert a == b
    mem = dict(tiered["memory"])
    assert mem.pop("tiers")["pinned"]["experts"] == 256
    assert mem == today["memory"]


def test_popular_experts_get_the_fast_tier():
    out = run()
    pre = out.prepared
    counts = popularity(np.asarray(pre.trace.experts), pre.col_src, 8)
    tier_of = np.asarray(pre.engine.tiers)
    # brute force: every pinned expert is routed at least as often as every pageable one, and so on
    for hi, lo in ((0, 1), (1, 2), (0, 2)):
        assert counts[tier_of == hi].min() >= counts[tier_of == lo].max()


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 50), min_size=1, max_size=40), sizes=st.lists(st.integers(1, 9), min_size=40, max_size=40),
       pinned=st.integers(0, 100), dram=st.integers(0, 200))
def test_assignment_respects_capacities_and_order(counts, sizes, pinned, dram):
    kb = sizes[: len(counts)]
    t = assign_tiers(counts, kb, pinned_bytes=pinned, dram_bytes=dram, storage_bytes=10**9)
    assert t.bytes["pinned"] <= min(pinned, dram) and t.bytes["pinned"] + t.bytes["pageable"] <= dram
    assert sum(t.bytes.values()) == sum(kb) and sum(t.experts.values()) == len(kb)
    order = np.argsort(-np.asarray(counts), kind="stable")
    tiers_in_order = [t.tier_of[k] for k in order]
    assert tiers_in_order == sorted(tiers_in_order)  # most routed first, tiers never go back


def test_bad_tier_input():
    with pytest.raises(InputError, match="pageable pins nothing"):
        load_and_prepare("runtime.host_memory=pageable")
    with pytest.raises(InputError, match="need storage"):
        load_and_prepare("runtime.expert_store=dram")
    with pytest.raises(InputError, match="pinned_capacity_gib"):
        load_scenario(SC, ["hardware.host_memory.pinned_capacity_gib=-1"])


def load_and_prepare(*sets):
    from moesim.engine.build import prepare

    return prepare(load_scenario(SC, [*SHORT, *sets]))
