"""Fitting the hardware model to the committed H100 measurements."""

from __future__ import annotations

import importlib.util
import json

import pytest

from moesim.errors import InputError
from moesim.hardware import fit
from moesim.hardware.spec import HardwareSpec
from tests.conftest import ROOT

MEAS = ROOT / "validate" / "measurements" / "external" / "h100-sxm"


@pytest.fixture(scope="module")
def report() -> dict:
    return fit.fit_report()


@pytest.fixture(scope="module")
def fitted() -> dict:
    return fit.fit_h100()


def test_default_dir_is_the_committed_copy():
    assert fit.default_measurement_dir().resolve() == MEAS.resolve()
    for name in fit.FILES + ("README.md", "PROVENANCE.md"):
        assert (MEAS / name).is_file(), name


def test_fitted_keys_are_spec_paths_with_sources(fitted):
    for path in fitted:
        model = HardwareSpec
        for key in path.split("."):
            assert key in model.model_fields, path
            ann = model.model_fields[key].annotation
            model = ann if isinstance(ann, type) and hasattr(ann, "model_fields") else None
    assert set(fitted) == set(fit.FIT_SOURCES)


def test_fitted_values_are_plausible(fitted):
    assert 50 < fitted["link.h2d_bandwidth_gb_s"] < 60
    assert 50 < fitted["link.d2h_bandwidth_gb_s"] < 60
    assert 3 < fitted["link.setup_us"] < 15
    assert 0.5 < fitted["link.bidirectional_derate"] < 1
    assert 0.6 < fitted["gpu.memory_efficiency"] < 1
    assert 0.6 < fitted["gpu.compute_efficiency"] < 1
    assert 1 < fitted["gpu.kernel_fixed_us"] < 10
    ci_mem = fitted["gpu.copy_interference.memory_bound_slowdown"]
    ci_cmp = fitted["gpu.copy_interference.compute_bound_slowdown"]
    assert ci_mem > ci_cmp >= 1.0
    assert fitted["host.launch_us"] > fitted["host.graph_launch_us"] > 0
    assert fitted["link.generation"] == 5 and fitted["link.width"] == 16
    assert fitted["cpu.cores_per_socket"] == 16


def test_pinned_line_fits_large_copies(report):
    big = [r for r in report["pinned"]["residuals"] if r["bytes"] >= 2**20]
    assert big and all(abs(r["rel_err"]) < 0.02 for r in big)


def test_memory_line_fits_small_expert_calls(report):
    assert report["memory"]["max_abs_rel_err"] < 0.05


def test_d2h_keeps_more_than_h2d_when_both_run(report):
    b = report["bidirectional"]
    assert b["derate"] == b["h2d"] < b["d2h"] <= 1.0


def test_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError) as ei:
        fit.fit_h100(tmp_path)
    assert "env.json" in ei.value.line()


def test_rounding():
    assert fit.round_sig(54.888848) == 54.89
    assert fit.round_sig(0.0) == 0.0


def test_tables_are_reproducible():
    for name, build in fit.TABLE_FILES.items():
        committed = (fit.table_dir() / name).read_text(encoding="utf-8")
        assert committed == fit.render_table(build())
        assert json.loads(committed)["rows"]


def test_gpu_table_has_medians():
    src = json.loads((MEAS / "expert_gpu.json").read_text())
    table = fit.expert_gpu_table()
    assert table["dtype"] == "bf16" and len(table["rows"]) == len(src["rows"])
    row = next(r for r in table["rows"] if r["shape"] == "mixtral" and r["tokens"] == 1)
    ref = next(r for r in src["rows"] if r["shape"] == "mixtral" and r["tokens"] == 1)
    assert row["graph_us"] == pytest.approx(ref["graph_us"]["median"], abs=1e-3)
    cpu = fit.expert_cpu_table()
    assert {r["dtype"] for r in cpu["rows"]} == {"fp32", "bf16"}
    assert all(r["threads"] == 16 for r in cpu["rows"])


def test_extract_script_check_mode(tmp_path):
    spec = importlib.util.spec_from_file_location("extract_tables", ROOT / "validate" / "extract_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0
    assert mod.main(["--out", str(tmp_path)]) == 0
    assert mod.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "h100-host-cpu-expert.json").write_text("{}")
    assert mod.main(["--check", "--out", str(tmp_path)]) == 1


def test_main_prints_yaml(capsys):
    assert fit.main([]) == 0
    out = capsys.readouterr().out
    assert "link.h2d_bandwidth_gb_s" in out and "expert-sized H2D copy" in out
