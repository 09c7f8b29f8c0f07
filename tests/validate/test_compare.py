"""``validate.compare`` and ``moesim validate compare``: the committed component report is what the
committed measurements give, MAPE and one row by hand, and the --fail-above exit code."""

from __future__ import annotations

import json

import pytest

from moesim.cli import main
from moesim.hardware.presets import load_hardware_preset
from tests.conftest import ROOT
from validate.compare import component_report, mape, render_json

REPORTS = ROOT / "validate" / "reports"
MEAS = ROOT / "validate" / "measurements" / "external" / "h100-sxm"


@pytest.fixture(scope="module")
def report():
    return component_report()


def test_committed_report_is_recomputed_from_committed_measurements(report):
    committed = json.loads((REPORTS / "component-report.json").read_text(encoding="utf-8"))
    assert committed == json.loads(render_json(report)), "rerun `moesim validate compare`"
    md = (REPORTS / "component-report.md").read_text(encoding="utf-8")
    for s in report["summary"]:
        assert f"| {s['component']} |" in md
    assert (REPORTS / "component-report.html").stat().st_size < 200_000  # plotly from the CDN


def test_explicit_measurement_dir_gives_the_same_rows(report):
    assert component_report(MEAS)["rows"] == report["rows"]


def test_mape_by_hand(report):
    rows = [r for r in report["rows"] if r["component"] == "h2d_pinned"]
    assert len(rows) == 9
    by_hand = sum(abs(r["predicted"] - r["measured"]) / r["measured"] for r in rows) / len(rows) * 100
    s = next(s for s in report["summary"] if s["component"] == "h2d_pinned")
    assert s["mape_pct"] == pytest.approx(by_hand, abs=1e-3)
    assert mape(rows) == pytest.approx(by_hand)
    for r in rows:
        assert r["error_pct"] == pytest.approx(100 * (r["predicted"] - r["measured"]) / r["measured"], abs=2e-3)


def test_mixtral_one_token_roofline_by_hand(report):
    gpu = load_hardware_preset("h100-sxm-pcie5")["gpu"]
    h, f = 4096, 14336
    nbytes = 3 * h * f * 2 + 1 * (2 * h + 3 * f) * 2  # weights + one token's activations, bf16
    want_us = nbytes / (3350e9 * gpu["memory_efficiency"]) * 1e6 + 5 * gpu["kernel_fixed_us"]
    row = next(r for r in report["rows"] if r["component"] == "expert_gpu_graph" and r["case"] == "mixtral n=1")
    assert row["predicted"] == pytest.approx(want_us, abs=1e-3)
    measured = json.loads((MEAS / "expert_gpu.json").read_text())["rows"]
    m = next(r for r in measured if r["shape"] == "mixtral" and r["tokens"] == 1)["graph_us"]["median"]
    assert row["measured"] == pytest.approx(m, abs=1e-4)
    assert row["in_sample"]


def test_eager_row_is_the_closed_form_steady_state(report):
    host = load_hardware_preset("h100-sxm-pcie5")["host"]
    lam = host["eager_op_us"]  # the engine's per-op cost of an eager call, not the bare enqueue
    assert lam > host["launch_us"]
    g = {r["case"]: r["predicted"] for r in report["rows"] if r["component"] == "expert_gpu_graph"}
    for r in report["rows"]:
        if r["component"] == "expert_gpu_eager":
            assert r["predicted"] == pytest.approx(max(g[r["case"]], 5 * lam), abs=2e-3)


def test_eager_in_sample_rows_are_the_fitted_shapes_and_small_token_counts(report):
    from moesim.hardware.fit import EAGER_FIT_SHAPES, MEMORY_BOUND_MAX_TOKENS

    for r in report["rows"]:
        if r["component"] == "expert_gpu_eager":
            shape, n = r["case"].split(" n=")
            assert r["in_sample"] == (shape in EAGER_FIT_SHAPES or int(n) <= MEMORY_BOUND_MAX_TOKENS), r["case"]
    s = next(s for s in report["summary"] if s["component"] == "expert_gpu_eager")
    assert s["out_of_sample_rows"] == 16


def test_cpu_rows_follow_the_fitted_model_by_hand(report):
    cpu = load_hardware_preset("h100-sxm-pcie5")["cpu"]
    assert cpu["overlap_compute_and_memory"] is False
    measured = json.loads((MEAS / "expert_cpu.json").read_text())["rows"]
    for m in measured:
        dt = {"float32": "fp32", "bfloat16": "bf16"}[m["dtype"]]
        passes = cpu["weight_passes"].get(dt, 1.0)
        peak = cpu["peak_gflops_bf16"] if dt == "bf16" else cpu["peak_gflops_fp32"]
        want_ms = (cpu["call_overhead_us"] * 1e-6 + passes * m["weight_bytes"] / (cpu["dram_bandwidth_gb_s"] * 1e9)
                   + 6 * m["h"] * m["f"] * m["tokens"] / (peak * 1e9 * cpu["compute_efficiency"])) * 1e3
        row = next(r for r in report["rows"]
                   if r["component"] == f"cpu_expert_{dt}" and r["case"] == f"{m['shape']} n={m['tokens']}")
        assert row["predicted"] == pytest.approx(want_ms, abs=1e-4)


def test_every_component_and_in_sample_marks(report):
    comps = {s["component"] for s in report["summary"]}
    assert comps == {"expert_gpu_graph", "expert_gpu_eager", "h2d_pinned", "d2h_pinned", "h2d_pageable",
                     "d2h_pageable", "h2d_expert_series", "cpu_expert_bf16", "cpu_expert_fp32"}
    assert all(r["in_sample"] for r in report["rows"] if r["component"] == "h2d_pinned")
    # the CPU fit used the Mixtral rows and the 1-token fp32 rows; Qwen-MoE's others are held out
    for comp in ("cpu_expert_bf16", "cpu_expert_fp32"):
        for r in report["rows"]:
            if r["component"] == comp:
                want = r["case"].startswith("mixtral") or (comp == "cpu_expert_fp32" and r["case"].endswith(" n=1"))
                assert r["in_sample"] == want, (comp, r["case"])
    assert report["end_to_end"] is None and any("end-to-end" in c for c in report["caveats"])


def test_fail_above_tiny_threshold_exits_1_and_names_component(tmp_path, capsys):
    assert main(["validate", "compare", "--out", str(tmp_path / "r"), "--fail-above", "0.001"]) == 1
    err = capsys.readouterr().err
    assert "expert_gpu_graph" in err and "exceeds" in err
    assert {p.name for p in (tmp_path / "r").iterdir()} == {
        "component-report.json", "component-report.md", "component-report.html"}


def test_fail_above_huge_threshold_exits_0(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default measurements do not depend on the working directory
    assert main(["validate", "compare", "--out", "rep", "--fail-above", "1000"]) == 0
    out = capsys.readouterr().out
    assert "| expert_gpu_graph |" in out
    assert (tmp_path / "rep" / "component-report.json").is_file()
