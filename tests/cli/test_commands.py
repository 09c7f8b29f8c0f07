"""The other CLI commands: presets, trace stats/convert/synth."""

from __future__ import annotations

import json

import numpy as np

from moesim.cli import main
from moesim.traces import load_trace
from tests.conftest import ROOT


def test_presets_lists_everything(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("h100-sxm-pcie5", "jetson-agx-orin", "mixtral-8x7b", "deepseek-v3", "lru", "streaming", "all_resident", "gpu_only"):
        assert name in out
    assert main(["presets", "nonsense"]) == 2


def test_trace_convert_and_stats(tmp_path, capsys):
    src = ROOT / "traces" / "raw" / "switch-base-8" / "router-trace.v2.json"
    dst = tmp_path / "sw.npz"
    assert main(["trace", "convert", str(src), str(dst)]) == 0
    a, b = load_trace(dst), load_trace(ROOT / "traces" / "switch-base-8.npz")
    assert np.array_equal(a.experts, b.experts)
    capsys.readouterr()
    assert main(["trace", "stats", str(dst), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["tokens"] == 215 and st["num_layers"] == 6


def test_trace_synth(tmp_path):
    dst = tmp_path / "q.npz"
    assert main(["trace", "synth", str(dst), "--model", "qwen3-30b-a3b", "--tokens", "64", "--seed", "3"]) == 0
    tr = load_trace(dst)
    assert tr.experts.shape == (64, 48, 8)
    assert main(["trace", "synth", str(tmp_path / "x.npz"), "--model", "nope"]) == 2


def test_trace_stats_bad_file(tmp_path, capsys):
    p = tmp_path / "bad.npz"
    p.write_bytes(b"not a zip")
    assert main(["trace", "stats", str(p)]) == 2
    assert "bad.npz" in capsys.readouterr().err


def test_run_several_scenarios_ranks_them(tmp_path, capsys):
    sc = ROOT / "scenarios"
    files = [str(sc / "mixtral-8x7b-h100-lru-c96.yaml"), str(sc / "mixtral-8x7b-h100-streaming.yaml"),
             str(sc / "mixtral-8x7b-h100-resident-fp8.yaml")]
    args = ["run", *files, "--out", str(tmp_path / "cmp"), "--set", "workload.max_tokens=24", "--set", "workload.warmup_tokens=0"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [ln.split()[1] for ln in out[2:]]
    assert rows == ["mixtral-8x7b-h100-resident-fp8", "mixtral-8x7b-h100-lru-c96", "mixtral-8x7b-h100-streaming"]
    for name in rows:
        assert (tmp_path / "cmp" / name / "summary.json").is_file()
    # one bad file: nothing runs, nothing is written
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {preset: nope}\n")
    assert main(["run", files[0], str(bad), "--out", str(tmp_path / "cmp2")]) == 2
    assert not (tmp_path / "cmp2").exists()
