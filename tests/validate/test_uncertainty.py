"""Replicated runs with the measured timing spread (``moesim run --replicas N``,
``moesim.perf.uncertainty``): zero spread reproduces the plain run, bands widen with the spread,
are ordered and deterministic, the bundled H100 spread is what the committed data gives."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.hardware.fit import load_measurements
from moesim.perf import uncertainty as unc
from tests.conftest import ROOT

LRU = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml"
FIDDLER = ROOT / "scenarios" / "mixtral-8x7b-h100-fiddler-c96.yaml"
SHORT = ["workload.max_tokens=48", "workload.warmup_tokens=8"]


def _scenario(path=LRU, sets=(), seed=None):
    return load_scenario(path, [*SHORT, *sets], seed=seed)


@pytest.fixture(scope="module")
def spread():
    return unc.load_spread(None, "h100-sxm-pcie5")[0]


def _strip(s: dict) -> dict:
    return {k: v for k, v in s.items() if k != "wall_time_s"}


@pytest.mark.parametrize("path", [LRU, FIDDLER], ids=["lru", "fiddler"])
def test_one_replica_with_zero_spread_is_the_plain_run(path):
    sc = _scenario(path)
    plain = simulate(sc).summary
    (rep,) = unc.run_replicas(sc, 1, unc.zero_spread())
    assert _strip(rep) == _strip(plain)


def test_spread_changes_times_but_not_counts(spread):
    sc = _scenario(FIDDLER)
    plain = simulate(sc).summary
    (rep,) = unc.run_replicas(sc, 1, spread)
    assert rep["tpot_ms"]["mean"] != plain["tpot_ms"]["mean"]
    assert rep["cache"] == plain["cache"] and rep["transfers"] == plain["transfers"]


def _width(block, key="tpot_mean_ms"):
    b = block["bands"][key]
    return b["p90"] - b["p10"]


def test_bands_widen_with_the_spread(spread):
    sc = _scenario()
    widths = []
    for scale in (0.0, 1.0, 4.0, 16.0):
        reps = unc.run_replicas(sc, 8, spread, scale=scale)
        widths.append(_width(unc.uncertainty_block(reps, seed=sc.seed, spread_source="x", spread=spread, scale=scale)))
    assert widths[0] == 0.0
    assert widths[0] < widths[1] < widths[2] < widths[3]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), scale=st.sampled_from([0.5, 2.0, 8.0]), n=st.integers(2, 5))
def test_bands_are_ordered_and_deterministic(spread, seed, scale, n):
    sc = _scenario(seed=seed)
    a = unc.uncertainty_block(unc.run_replicas(sc, n, spread, scale=scale), seed=seed, spread_source="x",
                              spread=spread, scale=scale)
    b = unc.uncertainty_block(unc.run_replicas(sc, n, spread, scale=scale), seed=seed, spread_source="x",
                              spread=spread, scale=scale)
    assert a == b
    assert a["seeds"] == [seed + i for i in range(n)]
    for band in a["bands"].values():
        assert band["p10"] <= band["p50"] <= band["p90"]


def test_replica_i_uses_seed_plus_i(spread):
    sc0, sc3 = _scenario(seed=0), _scenario(seed=3)
    four = unc.run_replicas(sc0, 4, spread, scale=4.0)
    (fourth,) = unc.run_replicas(sc3, 1, spread, scale=4.0)
    assert four[3]["tpot_ms"] == fourth["tpot_ms"]
    assert four[0]["tpot_ms"] != four[1]["tpot_ms"]


def test_multipliers_have_the_measured_sigma_and_median_one():
    sp = unc.zero_spread()
    sp["gpu_kernel"]["sigma"] = 0.2
    noise = unc.ReplicaNoise(sp, 7)
    x = np.log([noise.kernel() for _ in range(20000)])
    assert abs(np.median(x)) < 0.01 and abs(x.std() - 0.2) < 0.01


def test_copy_sigma_is_interpolated_in_log_bytes():
    sp = unc.zero_spread()
    sp["copy"]["h2d_pinned"] = [[1024, 0.1], [1024 * 1024, 0.4]]
    n = unc.ReplicaNoise(sp, 0)
    assert n.copy_sigma(1024) == pytest.approx(0.1)
    assert n.copy_sigma(1024 * 1024) == pytest.approx(0.4)
    assert n.copy_sigma(32 * 1024) == pytest.approx(0.1 + 0.3 * math.log(32) / math.log(1024))
    assert n.copy_sigma(10) == pytest.approx(0.1) and n.copy_sigma(2**40) == pytest.approx(0.4)
    del sp["copy"]["h2d_pageable"]
    pg = unc.ReplicaNoise(sp, 0, pageable=True)  # no pageable table: the pinned one stands in
    assert pg.copy_sigma(1024) == pytest.approx(0.1)


def test_sigma_from_p10_p90_by_hand():
    assert unc.sigma_of({"p10": 1.0, "p90": math.exp(2 * unc.Z90 * 0.05)}) == pytest.approx(0.05)
    assert unc.sigma_of({"p10": 0.0, "p90": 1.0}) is None


def test_bundled_h100_spread_is_what_the_committed_data_gives():
    fresh = unc.fit_spread(load_measurements(), hardware="h100-sxm-pcie5",
                           source="validate/measurements/external/h100-sxm")
    path = unc.bundled_spread_path("h100-sxm-pcie5")
    assert path.read_text(encoding="utf-8") == unc.render_spread(fresh), "rerun `moesim validate fit`"
    # spot check one row by hand: pinned H2D 4 KiB
    t = next(r for r in load_measurements()["link"]["transfers"]
             if r["mode"] == "pinned" and r["direction"] == "H2D" and r["bytes"] == 4096)
    want = math.log(t["event_ms"]["p90"] / t["event_ms"]["p10"]) / (2 * unc.Z90)
    assert dict(map(tuple, fresh["copy"]["h2d_pinned"]))[4096] == pytest.approx(want, rel=1e-3)


def test_cli_replicas_block_and_plain_run_unchanged(tmp_path, capsys):
    sets = [a for s in SHORT for a in ("--set", s)]
    assert main(["run", str(LRU), *sets, "--out", str(tmp_path / "plain")]) == 0
    assert main(["run", str(LRU), *sets, "--out", str(tmp_path / "rep"), "--replicas", "3"]) == 0
    out = capsys.readouterr().out
    assert "replicas   3 (spread moesim/perf/tables/h100-sxm-pcie5-spread.json)" in out
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    rep = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert "uncertainty" not in plain
    u = rep.pop("uncertainty")
    assert _strip(rep) == _strip(plain)
    assert u["replicas"] == 3 and u["seeds"] == [0, 1, 2] and len(u["per_replica"]) == 3
    vals = [r["tpot_mean_ms"] for r in u["per_replica"]]
    assert u["bands"]["tpot_mean_ms"]["p50"] == pytest.approx(float(np.median(vals)))


def test_cli_zero_spread_file_gives_a_point_band(tmp_path):
    f = tmp_path / "zero.json"
    f.write_text(json.dumps(unc.zero_spread()))
    sets = [a for s in SHORT for a in ("--set", s)]
    assert main(["run", str(LRU), *sets, "--out", str(tmp_path / "r"), "--replicas", "2", "--spread", str(f)]) == 0
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    b = s["uncertainty"]["bands"]["tpot_mean_ms"]
    assert b["p10"] == b["p90"] == pytest.approx(s["tpot_ms"]["mean"], rel=1e-12)


@pytest.mark.parametrize("extra,needle", [
    (["--spread", "/nonexistent/spread.json"], "file not found"),
    (["--set", "hardware.name=nobody"], "no measured spread for hardware 'nobody'"),
])
def test_cli_replicas_bad_input_exits_2(tmp_path, capsys, extra, needle):
    args = ["run", str(LRU), "--out", str(tmp_path / "r"), "--replicas", "2", *extra]
    assert main(args) == 2
    assert needle in capsys.readouterr().err


def test_bad_spread_file_names_the_field(tmp_path, capsys):
    f = tmp_path / "bad.json"
    sp = unc.zero_spread()
    sp["gpu_kernel"]["sigma"] = -1
    f.write_text(json.dumps(sp))
    assert main(["run", str(LRU), "--out", str(tmp_path / "r"), "--replicas", "1", "--spread", str(f)]) == 2
    assert "gpu_kernel.sigma" in capsys.readouterr().err
