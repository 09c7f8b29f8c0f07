"""``moesim validate fit``: the committed H100 data gives back the h100-sxm-pcie5 preset's fitted
numbers, its expert tables and its spread; the profile is a valid hardware description that runs
like the preset; incomplete or CPU-only folders are refused with a line naming what is missing."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from moesim.cli import main
from moesim.config.loader import load_scenario, scenario_from_dict
from moesim.engine.run import simulate
from moesim.hardware import fit as hwfit
from moesim.hardware.presets import load_hardware_preset
from moesim.hardware.spec import HardwareSpec
from moesim.perf import uncertainty as unc
from tests.conftest import ROOT
from validate.profile import fit_profile, profile_files

TABLES = ROOT / "moesim" / "perf" / "tables"


@pytest.fixture(scope="module")
def fitted():
    return fit_profile(name="h100-sxm-pcie5")


def _get(d, dotted):
    for k in dotted.split("."):
        d = d[k]
    return d


def test_committed_data_reproduces_the_preset(fitted):
    preset = load_hardware_preset("h100-sxm-pcie5")
    assert set(fitted["fitted"]) == set(hwfit.FIT_SOURCES)
    for key, value in fitted["fitted"].items():
        assert _get(fitted["hardware"], key) == _get(preset, key) == value, key
    for block in ("gpu", "host", "cpu", "host_memory", "link"):
        assert fitted["hardware"][block] == preset[block], block
    assert fitted["kept_from_base"] == []
    HardwareSpec.model_validate(fitted["hardware"])


def test_tables_and_spread_equal_the_committed_ones(fitted):
    g = fitted["tables"]["h100-sxm-pcie5-bf16-expert.json"]
    c = fitted["tables"]["h100-sxm-pcie5-host-cpu-expert.json"]
    assert g["rows"] == json.loads((TABLES / "h100-sxm-bf16-expert.json").read_text())["rows"]
    assert c["rows"] == json.loads((TABLES / "h100-host-cpu-expert.json").read_text())["rows"]
    files = profile_files(fitted)
    assert files["h100-sxm-pcie5-spread.json"] == unc.bundled_spread_path("h100-sxm-pcie5").read_text()


def test_every_value_has_a_source_naming_the_data(fitted):
    src = fitted["hardware"]["sources"]
    for key in hwfit.FIT_SOURCES:
        if isinstance(fitted["fitted"][key], bool):  # a model choice: sources name numbers only
            assert key not in src, key
            continue
        assert "validate/measurements/external/h100-sxm" in src[key], key
        assert "moesim.hardware.fit" not in src[key], key  # says which command fitted it


def test_profile_runs_like_the_preset(fitted, tmp_path):
    sets = ["workload.max_tokens=32", "workload.warmup_tokens=4"]
    sc = load_scenario(ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml", sets)
    raw = json.loads(json.dumps(sc.model_dump(mode="json")))
    raw["trace"] = {"path": sc.trace.path}
    hw = copy.deepcopy(fitted["hardware"])
    # the profile's tables hold the same rows as the committed ones (checked above): name those
    hw["expert_profile"], hw["cpu_expert_profile"] = "h100-sxm-bf16", "h100-host-cpu"
    raw["hardware"] = hw
    a, b = simulate(sc).summary, simulate(scenario_from_dict(raw)).summary
    for k in ("tpot_ms", "cache", "transfers", "critical_path_ms"):
        assert a[k] == b[k], k


def test_measured_graph_and_copy_issue_costs_are_used():
    env = hwfit.load_measurements()["env"]
    assert hwfit.fit_host_costs(env)["graph_launch_measured"] is False
    env = copy.deepcopy(env)
    stat = {"median": 3.25, "mean": 3.3, "min": 3.0, "max": 4.0, "p10": 3.1, "p90": 3.5, "n": 3}
    env["host_overheads"]["graph_replay_1_kernel"] = {"host_enqueue_us_per_launch": stat}
    env["host_overheads"]["h2d_copy_4KiB_pinned_issue"] = {"host_enqueue_us_per_launch": dict(stat, median=5.5)}
    h = hwfit.fit_host_costs(env)
    assert (h["graph_launch_us"], h["copy_issue_us"]) == (3.25, 5.5)
    assert h["graph_launch_measured"] and h["copy_issue_measured"]


def test_cli_writes_the_files(tmp_path, capsys):
    assert main(["validate", "fit", "--name", "my-h100", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "H2D 54.89 GB/s" in out and "--install" in out
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"my-h100.yaml", "my-h100-bf16-expert.json", "my-h100-host-cpu-expert.json", "my-h100-spread.json"}
    hw = yaml.safe_load((tmp_path / "my-h100.yaml").read_text())
    assert hw["name"] == "my-h100" and hw["expert_profile"] == "my-h100-bf16"
    HardwareSpec.model_validate(hw)
    unc.validate_spread(json.loads((tmp_path / "my-h100-spread.json").read_text()), "x")


def test_install_refuses_to_replace_a_preset(tmp_path, capsys):
    before = (ROOT / "moesim" / "hardware" / "presets" / "h100-sxm-pcie5.yaml").read_text()
    assert main(["validate", "fit", "--name", "h100-sxm-pcie5", "--out", str(tmp_path), "--install"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (ROOT / "moesim" / "hardware" / "presets" / "h100-sxm-pcie5.yaml").read_text() == before
    assert not (TABLES / "h100-sxm-pcie5-bf16-expert.json").exists()


def test_incomplete_folder_names_the_missing_parts(tmp_path, capsys):
    src = hwfit.default_measurement_dir()
    for f in ("env.json", "expert_gpu.json"):
        (tmp_path / f).write_text((src / f).read_text())
    assert main(["validate", "fit", "--measurements", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "link.json (measure part copies)" in err and "expert_cpu.json (measure part cpu)" in err


def test_cpu_measurement_is_refused(tmp_path, capsys):
    src = hwfit.default_measurement_dir()
    for f in hwfit.FILES:
        (tmp_path / f).write_text((src / f).read_text())
    env = json.loads((tmp_path / "env.json").read_text())
    env["device"]["total_memory"] = None  # what a CPU run records
    (tmp_path / "env.json").write_text(json.dumps(env))
    assert main(["validate", "fit", "--measurements", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bad_name_is_refused(capsys):
    assert main(["validate", "fit", "--name", "Bad Name"]) == 2
    assert "--name" in capsys.readouterr().err
