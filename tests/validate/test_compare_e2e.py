"""The end-to-end report of ``moesim validate compare --e2e``, on CPU runs of the offloaded decode
harness at tiny shapes made here: every figure is recomputed from the e2e.json files and moesim's
runs (editing a measurement changes the report), the MAPE by hand, the CPU label, --fail-above and
the replica bands."""

from __future__ import annotations

import json
import shutil

import pytest

from moesim.cli import main
from tests.conftest import ROOT
from validate import compare_e2e as ce
from validate.e2e import simulate_result

pytest.importorskip("transformers")
MIXTRAL = ROOT / "traces" / "mixtral-8x7b-synth.npz"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from validate.e2e import run_e2e

    root = tmp_path_factory.mktemp("e2e")
    for name, policy, cap in (("lru-c6", "lru", 6), ("streaming", "streaming", None)):
        run_e2e(model="mixtral", layers=2, policy=policy, capacity=cap, trace=MIXTRAL, tokens=10, warmup=2,
                out=root / name, device="cpu", log=lambda *a: None)
    return root


@pytest.fixture(scope="module")
def report(runs):
    return ce.e2e_report(runs)


def test_rows_are_the_measurements_and_moesims_runs(runs, report):
    assert [r["experiment"] for r in report["rows"]] == ["lru-c6", "streaming"]
    for r in report["rows"]:
        e = json.loads((runs / r["experiment"] / "e2e.json").read_text())
        s = simulate_result(runs / r["experiment"])
        assert r["measured_mean_ms"] == pytest.approx(e["summary"]["token_latency_ms_mean"], abs=1e-4)
        assert r["measured_p90_ms"] == pytest.approx(e["summary"]["token_latency_ms_p90"], abs=1e-4)
        assert r["simulated_mean_ms"] == pytest.approx(s["tpot_ms"]["mean"], abs=1e-4)
        assert r["simulated_p90_ms"] == pytest.approx(s["tpot_ms"]["p90"], abs=1e-4)
        assert r["mean_error_pct"] == pytest.approx(
            100 * (r["simulated_mean_ms"] - r["measured_mean_ms"]) / r["measured_mean_ms"], abs=0.01)
        assert (r["measured_hits"], r["measured_misses"]) == (e["counts"]["measured"]["hits"],
                                                              e["counts"]["measured"]["misses"])
        assert r["counts_match"] and r["simulated_bytes_h2d"] == r["measured_bytes_h2d"]
        assert r["device"] == "cpu"
    (s,) = report["summary"]
    by_hand = sum(abs(r["mean_error_pct"]) for r in report["rows"]) / 2
    assert s["mape_mean_pct"] == pytest.approx(by_hand, abs=1e-3) and s["counts_match"] == 2


def test_cpu_runs_are_labelled_not_gpu_accuracy(report):
    assert report["caveats"][0].startswith("CPU runs") and "says nothing about moesim's GPU accuracy" in \
        report["caveats"][0]
    md = ce.render_markdown(report)
    assert md.splitlines()[2].startswith("> CPU runs") and "No GPU end-to-end measurement" in md


def test_editing_a_measurement_changes_the_report(runs, report, tmp_path):
    shutil.copytree(runs, tmp_path / "e2e")
    f = tmp_path / "e2e" / "lru-c6" / "e2e.json"
    e = json.loads(f.read_text())
    e["summary"]["token_latency_ms_mean"] *= 2
    f.write_text(json.dumps(e))
    new = ce.e2e_report(tmp_path / "e2e")
    old_row, new_row = report["rows"][0], new["rows"][0]
    assert new_row["measured_mean_ms"] == pytest.approx(2 * old_row["measured_mean_ms"], abs=1e-3)
    assert new_row["simulated_mean_ms"] == old_row["simulated_mean_ms"]
    assert new["summary"][0]["mape_mean_pct"] != report["summary"][0]["mape_mean_pct"]


def test_replica_bands_and_inside_flags(runs, tmp_path):
    shutil.copytree(runs, tmp_path / "e2e")
    f = tmp_path / "e2e" / "lru-c6" / "e2e.json"
    e = json.loads(f.read_text())
    first = ce.e2e_report(tmp_path / "e2e", replicas=4, spread_scale=5.0)
    lo, hi = first["rows"][0]["band_mean_ms"]
    assert lo < hi
    e["summary"]["token_latency_ms_mean"] = (lo + hi) / 2  # a measurement inside the band
    f.write_text(json.dumps(e))
    rep = ce.e2e_report(tmp_path / "e2e", replicas=4, spread_scale=5.0)  # same seeds: same bands
    assert rep["rows"][0]["band_mean_ms"] == [lo, hi]
    for r in rep["rows"]:
        lo, hi = r["band_mean_ms"]
        assert lo <= hi and r["mean_inside_band"] == (lo <= r["measured_mean_ms"] <= hi)
    assert rep["rows"][0]["mean_inside_band"]
    assert rep["summary"][0]["mean_inside_band"] == sum(r["mean_inside_band"] for r in rep["rows"])


def test_cli_writes_reports_and_fail_above(runs, tmp_path, capsys):
    assert main(["validate", "compare", "--out", str(tmp_path / "r"), "--e2e", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "| cpu | 2 |" in out and "note       CPU runs" in out
    for ext in ("json", "md", "html"):
        assert (tmp_path / "r" / f"e2e-report.{ext}").is_file()
    shutil.copytree(runs, tmp_path / "e2e")
    for d in ("lru-c6", "streaming"):  # measurements 1000x below the simulation: MAPE ~ 1e5 %
        f = tmp_path / "e2e" / d / "e2e.json"
        e = json.loads(f.read_text())
        e["summary"]["token_latency_ms_mean"] = simulate_result(tmp_path / "e2e" / d)["tpot_ms"]["mean"] / 1000
        f.write_text(json.dumps(e))
    assert main(["validate", "compare", "--out", str(tmp_path / "r2"), "--e2e", str(tmp_path / "e2e"),
                 "--fail-above", "5000"]) == 1
    assert "end-to-end (cpu): mean token latency MAPE" in capsys.readouterr().err


def test_no_experiments_is_an_input_error(tmp_path, capsys):
    assert main(["validate", "compare", "--out", str(tmp_path / "r"), "--e2e", str(tmp_path)]) == 2
    assert "no e2e.json found" in capsys.readouterr().err
