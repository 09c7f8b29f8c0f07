"""Every kind of bad input ends with one clear line naming the file and the field, exit code 2, no
traceback and no output directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from moesim.cli import main
from tests.conftest import ROOT

BASE = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c32.yaml"


def _scenario(tmp_path: Path, body: dict, name: str = "bad.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(body))
    return p


def _run_bad(capsys, tmp_path, path, *extra):
    out = tmp_path / "out"
    code = main(["run", str(path), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert not out.exists()
    return lines[0]


def base_with(**changes) -> dict:
    body = {"include": [str(BASE)], "name": "bad"}
    body.update(changes)
    return body


CASES = {
    "unknown key": (base_with(workload={"batch_sise": 2}), ["workload.batch_sise", "unknown key"]),
    "wrong type": (base_with(workload={"batch_size": "two"}), ["workload.batch_size", "integer"]),
    "unknown model preset": (base_with(model={"preset": "mixtral-9x9b"}), ["model.preset", "valid:", "mixtral-8x7b"]),
    "unknown hardware preset": (base_with(hardware={"preset": "h999"}), ["hardware.preset", "valid:", "h100-sxm-pcie5"]),
    "unknown policy kind": (base_with(policies={"cache": {"kind": "lruu", "capacity_experts": 8}}), ["policies.cache", "lru"]),
    "missing trace": (base_with(trace={"path": "no/such/trace.npz"}), ["trace.npz"]),
    "capacity below top-k": (base_with(policies={"cache": {"kind": "lru", "capacity_experts": 1}}), ["policies.cache.capacity_experts", "top_k=2"]),
    "non-positive bandwidth": (base_with(hardware={"preset": "h100-sxm-pcie5", "link": {"h2d_bandwidth_gb_s": 0}}), ["hardware.link.h2d_bandwidth_gb_s", "greater than 0"]),
    "does not fit": (base_with(policies={"cache": {"kind": "all_resident"}}), ["does not fit in GPU memory", "GiB", "policies.cache.kind"]),
    "profile table as a path": (base_with(hardware={"preset": "h100-sxm-pcie5", "expert_profile": "../../x"}),
                                ["hardware.expert_profile", "pattern"]),
    "cache too big": (base_with(policies={"cache": {"kind": "lru", "capacity_experts": 250}}), ["does not fit", "250 slots"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_scenario_gives_one_line(case, tmp_path, capsys):
    body, needles = CASES[case]
    path = _scenario(tmp_path, body)
    line = _run_bad(capsys, tmp_path, path)
    assert str(path) in line or "trace.npz" in line, line
    for n in needles:
        assert n in line, (n, line)


def test_trace_not_matching_model(tmp_path, capsys):
    # a trace with expert ids beyond the model's 8 experts
    from moesim.traces import Trace, save_trace

    tr = Trace(experts=np.full((16, 32, 2), 0, dtype=np.int16), meta={"format_version": 1, "num_experts": 64, "top_k": 2, "layers": list(range(32))})
    tr.experts[:, :, 1] = 40
    save_trace(tr, tmp_path / "wide.npz")
    path = _scenario(tmp_path, base_with(trace={"path": str(tmp_path / "wide.npz")}))
    line = _run_bad(capsys, tmp_path, path)
    assert "wide.npz" in line and "experts" in line


def test_trace_with_wrong_layer_count(tmp_path, capsys):
    from moesim.traces import Trace, save_trace

    tr = Trace(experts=np.zeros((16, 5, 2), dtype=np.int16), meta={"format_version": 1})
    tr.experts[:, :, 1] = 1
    save_trace(tr, tmp_path / "short.npz")
    path = _scenario(tmp_path, base_with(trace={"path": str(tmp_path / "short.npz")}))
    line = _run_bad(capsys, tmp_path, path)
    assert "short.npz" in line


def test_bad_yaml_and_missing_file(tmp_path, capsys):
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n")
    line = _run_bad(capsys, tmp_path, p)
    assert "broken.yaml" in line and "line" in line
    line = _run_bad(capsys, tmp_path, tmp_path / "absent.yaml")
    assert "absent.yaml" in line and "not found" in line


def test_bad_set_value(tmp_path, capsys):
    line = _run_bad(capsys, tmp_path, BASE, "--set", "workload.max_tokens=-3")
    assert "workload.max_tokens" in line
    line = _run_bad(capsys, tmp_path, BASE, "--set", "novalue")
    assert "--set" in line


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", str(BASE), "--out", str(out), "--set", "workload.max_tokens=40", "--set", "workload.warmup_tokens=0", "-q"]
    assert main(args) == 0
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
