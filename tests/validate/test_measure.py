"""``validate.measure`` on the CPU: CUDA-only parts are skipped with a note, the CPU part runs, and
with the CPU stand-in for CUDA (``emulate_cuda``) every part writes files in the external data set's
layout that ``moesim.hardware.fit`` and ``validate.compare`` read unchanged."""

from __future__ import annotations

import json
import shutil

import pytest

from moesim.cli import main
from validate.measure import CUDA_PARTS, check_format, reference_dir, run_measure

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("emulated")
    res = run_measure(out, None, "cpu", quick=True, emulate_cuda=True, log=lambda *a: None)
    return out, res


def test_cpu_run_skips_cuda_parts_with_a_note(tmp_path, capsys):
    assert main(["validate", "measure", "--device", "cpu", "--quick", "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    for part in CUDA_PARTS:
        assert f"part '{part}' needs a CUDA device" in out
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert files == {"env.json", "expert_cpu.json", "attention.json"}  # attention runs on the CPU too
    env = json.loads((tmp_path / "m" / "env.json").read_text())
    assert {s["part"] for s in env["skipped_parts"]} >= set(CUDA_PARTS)
    assert env["_meta"]["smoke"] is True and env["cpu_model"] and env["os_cpu_count"] >= 1
    cpu = json.loads((tmp_path / "m" / "expert_cpu.json").read_text())
    assert {r["dtype"] for r in cpu["rows"]} == {"float32", "bfloat16"}
    assert {r["threads"] for r in cpu["rows_by_threads"]} >= {1}
    for r in cpu["rows"]:
        assert r["ms"]["p10"] <= r["ms"]["median"] <= r["ms"]["p90"]
    assert check_format(tmp_path / "m") == []


def test_emulated_cuda_paths_write_the_reference_layout(emulated):
    out, res = emulated
    assert {p.name for p in out.iterdir()} == {"env.json", "link.json", "expert_gpu.json", "expert_cpu.json",
                                               "attention.json"}
    assert res["skipped"] == [] and res["format_problems"] == []
    link = json.loads((out / "link.json").read_text())
    assert link["_meta"]["emulated"] is True
    modes = {(t["mode"], t["direction"]) for t in link["transfers"]}
    assert modes == {("pinned", "H2D"), ("pinned", "D2H"), ("pageable", "H2D"), ("pageable", "D2H")}
    kinds = {(c["kernel"].split("_")[0], c["direction"]) for c in link["concurrent_copy_and_kernel"]["cases"]}
    assert kinds == {("gemm", "H2D"), ("gemm", "D2H"), ("mixtral", "H2D"), ("mixtral", "D2H")}
    env = json.loads((out / "env.json").read_text())
    ho = env["host_overheads"]
    assert {"tiny_add_", "event_record_and_synchronize_idle_us", "small_d2h_pinned_plus_sync_idle_us"} <= set(ho)


def test_fit_and_compare_read_the_folder_unchanged(emulated):
    from moesim.hardware import fit
    from validate.compare import component_rows

    out, _ = emulated
    m = fit.load_measurements(out)
    assert fit.fit_pinned_link(m["link"])["h2d_gb_s"] > 0
    assert set(fit.fit_copy_interference(m["link"])) >= {"memory_bound_slowdown", "compute_bound_slowdown"}
    assert fit.fit_host_costs(m["env"])["launch_us"] > 0
    assert fit.fit_compute_efficiency(m["env"], m["expert_gpu"])["gemm_tflops"] > 0
    assert fit.expert_gpu_table(out)["rows"] and fit.expert_cpu_table(out)["rows"]
    comps = {r["component"] for r in component_rows(out)}
    assert comps == {"expert_gpu_graph", "expert_gpu_eager", "h2d_pinned", "d2h_pinned", "h2d_pageable",
                     "d2h_pageable", "h2d_expert_series", "cpu_expert_bf16", "cpu_expert_fp32"}


def test_format_check_finds_a_missing_key(tmp_path):
    d = tmp_path / "ref"
    shutil.copytree(reference_dir(), d)
    assert check_format(d) == []
    g = json.loads((d / "expert_gpu.json").read_text())
    del g["rows"][0]["graph_us"]
    g["dtype"] = 16
    (d / "expert_gpu.json").write_text(json.dumps(g))
    problems = check_format(d)
    assert "expert_gpu.json.rows[0].graph_us: missing" in problems
    assert any(p.startswith("expert_gpu.json.dtype: expected a string") for p in problems)


def test_unknown_part_is_an_input_error(tmp_path, capsys):
    assert main(["validate", "measure", "--device", "cpu", "--out", str(tmp_path), "--parts", "cpu,gpus"]) == 2
    assert "unknown part(s) gpus" in capsys.readouterr().err


def test_suite_quick_on_cpu_packs_everything(tmp_path):
    import tarfile

    from validate.suite import run_suite

    s = run_suite(tmp_path / "suite", device="cpu", quick=True, tar=tmp_path / "suite.tgz")
    assert [st["ok"] for st in s["stages"]] == [True, True, True]
    names = tarfile.open(tmp_path / "suite.tgz").getnames()
    for want in ("suite/suite.json", "suite/measurements/env.json", "suite/measurements/attention.json",
                 "suite/e2e/mixtral-tiny-lru-c6/e2e.json",
                 "suite/e2e/mixtral-tiny-fiddler-c6/scenario.yaml"):
        assert want in names
