"""Fitting the hardware model to the committed H100 measurements."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest

from moesim.errors import InputError
from moesim.hardware import fit
from moesim.hardware.presets import load_hardware_preset
from moesim.hardware.spec import DTYPES, HardwareSpec
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
        keys = path.split(".")
        for i, key in enumerate(keys):
            assert key in model.model_fields, path
            ann = model.model_fields[key].annotation
            if getattr(ann, "__origin__", None) is dict:  # a per-dtype mapping: the last key is a dtype
                assert i == len(keys) - 2 and keys[-1] in DTYPES, path
                break
            model = ann if isinstance(ann, type) and hasattr(ann, "model_fields") else None
    assert set(fitted) == set(fit.FIT_SOURCES)
    HardwareSpec.model_validate(_with(load_hardware_preset("h100-sxm-pcie5"), fitted))


def _with(raw: dict, fitted: dict) -> dict:
    out = json.loads(json.dumps(raw))
    for path, value in fitted.items():
        d = out
        *head, last = path.split(".")
        for k in head:
            d = d.setdefault(k, {})
        d[last] = value
    return out


# ----- eager per-op host cost ---------------------------------------------------------------------
def _eager_rows():
    return json.loads((MEAS / "expert_gpu.json").read_text())


def test_eager_op_is_the_median_per_op_of_launch_bound_training_rows(report):
    g = _eager_rows()
    used = [r for r in g["rows"] if r["shape"] in fit.EAGER_FIT_SHAPES
            and r["eager_us"]["median"] >= fit.LAUNCH_BOUND_RATIO * r["graph_us"]["median"]]
    per_op = sorted(r["eager_us"]["median"] / 5 for r in used)
    k = len(per_op)
    want = per_op[k // 2] if k % 2 else (per_op[k // 2 - 1] + per_op[k // 2]) / 2
    e = report["eager"]
    assert e["eager_op_us"] == pytest.approx(want, rel=1e-12)
    assert e["rows_used"] == [f"{r['shape']} n={r['tokens']}" for r in used]
    assert not any(c.startswith(("mixtral", "qwen-moe")) for c in e["rows_used"])  # held out
    # a whole eager call costs about twice the bare enqueue of its kernels (launch microbenchmark)
    assert 1.5 < e["ratio_to_enqueue"] < 2.5
    assert e["eager_op_us"] > report["host"]["launch_us"]


def test_eager_fit_ignores_the_held_out_shapes(report):
    g = copy.deepcopy(_eager_rows())
    for r in g["rows"]:
        if r["shape"] not in fit.EAGER_FIT_SHAPES:
            r["eager_us"]["median"] *= 7.0  # whatever the held-out rows say, the fit does not move
    assert fit.fit_eager_op(g)["eager_op_us"] == report["eager"]["eager_op_us"]


def test_eager_fit_uses_every_shape_when_the_training_shapes_are_missing():
    g = copy.deepcopy(_eager_rows())
    g["rows"] = [r for r in g["rows"] if r["shape"] == "qwen-moe"]
    assert fit.eager_fit_shapes(g) == ("qwen-moe",)
    assert fit.fit_eager_op(g)["shapes"] == ["qwen-moe"]
    for r in g["rows"]:
        r["eager_us"]["median"] = r["graph_us"]["median"]  # nothing launch-bound
    with pytest.raises(InputError):
        fit.fit_eager_op(g)


# ----- CPU expert model ---------------------------------------------------------------------------
def test_cpu_overhead_and_rate_solve_the_one_token_rows(report):
    c = json.loads((MEAS / "expert_cpu.json").read_text())
    ce = report["cpu_expert"]
    for r in c["rows"]:
        if r["dtype"] == "float32" and r["tokens"] == 1:  # two shapes, two unknowns: exact
            t = ce["call_overhead_us"] * 1e-6 + r["weight_bytes"] / (ce["dram_gb_s"] * 1e9)
            assert t == pytest.approx(r["ms"]["median"] * 1e-3, rel=1e-9)
    assert 50 < ce["call_overhead_us"] < 200 and 90 < ce["dram_gb_s"] < 110


def test_cpu_bf16_makes_about_three_weight_passes_and_fp32_is_slow(report):
    ce = report["cpu_expert"]
    # bf16 time is flat in tokens: about three passes over its weights per call, not slow arithmetic
    assert 2.5 < ce["bf16_weight_passes"] < 3.5
    # fp32 arithmetic reaches well under half the AVX-512 peak at these token counts
    assert 0.15 < ce["compute_efficiency"] < 0.45
    assert ce["fit_shape"] == "mixtral"


def test_cpu_fit_marks_exactly_the_rows_it_used():
    c = json.loads((MEAS / "expert_cpu.json").read_text())
    ins = {(r["dtype"], r["shape"], r["tokens"]) for r in c["rows"] if fit.cpu_fit_in_sample(r, c)}
    out = [r for r in c["rows"] if not fit.cpu_fit_in_sample(r, c)]
    assert all(r["shape"] == "qwen-moe" for r in out) and len(out) == 11
    assert ("float32", "qwen-moe", 1) in ins and ("bfloat16", "qwen-moe", 1) not in ins
    held = copy.deepcopy(c)
    for r in held["rows"]:
        if not fit.cpu_fit_in_sample(r, c):
            r["ms"]["median"] *= 3.0  # the out-of-sample rows do not move the fit
    assert fit.fit_cpu_expert(held) == fit.fit_cpu_expert(c)


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
