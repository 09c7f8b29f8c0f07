"""Link timing: setup + bytes / rate, pageable tables by size, two-direction derate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.hardware.links import LinkModel
from moesim.hardware.presets import load_hardware_preset
from moesim.hardware.spec import HardwareSpec
from tests.conftest import ROOT

H100 = HardwareSpec.model_validate(load_hardware_preset("h100-sxm-pcie5"))
MEAS = ROOT / "validate" / "measurements" / "external" / "h100-sxm"


@pytest.fixture
def tiny(tiny_hw) -> LinkModel:
    return LinkModel(HardwareSpec.model_validate(tiny_hw))


def test_pinned_is_setup_plus_bytes_over_rate(tiny):
    n = 123_456_789
    assert tiny.duration_s(n, "h2d") == pytest.approx(10e-6 + n / 20e9, rel=1e-15)
    assert tiny.duration_s(n, "d2h") == pytest.approx(10e-6 + n / 20e9, rel=1e-15)
    link = LinkModel(H100)
    assert link.duration_s(n, "d2h") == pytest.approx(
        H100.link.setup_us * 1e-6 + n / (H100.link.d2h_bandwidth_gb_s * 1e9), rel=1e-15
    )


def test_zero_and_bad_arguments(tiny):
    assert tiny.duration_s(0) == 0.0
    with pytest.raises(ValueError):
        tiny.duration_s(-1)
    with pytest.raises(ValueError):
        tiny.duration_s(10, "sideways")


def test_derate_slows_both_directions(tiny):
    link = LinkModel(H100)
    n = 256 * 2**20
    for d in ("h2d", "d2h"):
        one = link.duration_s(n, d)
        both = link.duration_s(n, d, both_directions=True)
        assert both > one
        rate = getattr(H100.link, f"{d}_bandwidth_gb_s") * 1e9 * H100.link.bidirectional_derate
        assert both == pytest.approx(H100.link.setup_us * 1e-6 + n / rate, rel=1e-12)
    assert tiny.duration_s(n, both_directions=True) == tiny.duration_s(n)  # derate 1.0 by default


def test_pageable_interpolates_in_log_size_and_clamps(tiny):
    # tiny table: 1 GB/s at 4 KiB, 10 GB/s at 1 GiB; halfway in log(size) = geometric mean rate
    mid = math.sqrt(4096 * 2**30)
    assert tiny.rate_bytes_s(mid, pinned=False) == pytest.approx(math.sqrt(10) * 1e9, rel=1e-12)
    assert tiny.rate_bytes_s(1, pinned=False) == pytest.approx(1e9)
    assert tiny.rate_bytes_s(2**40, pinned=False) == pytest.approx(10e9)
    # no d2h table: the h2d one is used
    assert tiny.duration_s(mid, "d2h", pinned=False) == tiny.duration_s(mid, "h2d", pinned=False)


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_pageable_monotone_in_size(direction):
    link = LinkModel(H100)
    sizes = np.unique(np.logspace(0, 33, 2000, base=2).astype(np.int64))
    d = [link.duration_s(int(s), direction, pinned=False) for s in sizes]
    assert all(b >= a for a, b in zip(d, d[1:]))


@settings(max_examples=200, deadline=None)
@given(a=st.integers(1, 2**34), b=st.integers(1, 2**34), pinned=st.booleans(), d2h=st.booleans())
def test_duration_monotone_property(a, b, pinned, d2h):
    link = LinkModel(H100)
    lo, hi = min(a, b), max(a, b)
    d = "d2h" if d2h else "h2d"
    assert link.duration_s(lo, d, pinned=pinned) <= link.duration_s(hi, d, pinned=pinned)


def test_pageable_reproduces_measured_medians():
    link = LinkModel(H100)
    data = json.loads((MEAS / "link.json").read_text())
    for t in data["transfers"]:
        if t["mode"] != "pageable":
            continue
        pred = link.duration_s(t["bytes"], t["direction"].lower(), pinned=False)
        assert pred == pytest.approx(t["event_ms"]["median"] * 1e-3, rel=1e-3)


def test_expert_sized_copy_matches_measured_series():
    data = json.loads((MEAS / "link.json").read_text())["expert_sized_h2d_series"]
    assert data["bytes"] == 352_321_536
    pred = LinkModel(H100).duration_s(352_321_536, "h2d", pinned=True)
    measured = data["torch_pinned"]["ms"]["median"] * 1e-3
    assert abs(pred - measured) / measured < 0.05
