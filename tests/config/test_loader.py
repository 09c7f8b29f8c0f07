"""Scenario loading: include merging, relative paths, --set semantics, hashing, fuzzing."""

from __future__ import annotations

import shutil

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.config.loader import apply_overrides, deep_merge, load_raw, load_scenario, scenario_hash
from moesim.errors import InputError
from tests.conftest import ROOT

SC = ROOT / "scenarios"


def test_deep_merge_mappings_merge_lists_replace():
    a = {"x": {"y": 1, "z": [1, 2]}, "k": 1}
    b = {"x": {"z": [3]}, "n": 2}
    assert deep_merge(a, b) == {"x": {"y": 1, "z": [3]}, "k": 1, "n": 2}
    assert a == {"x": {"y": 1, "z": [1, 2]}, "k": 1}  # inputs untouched


def test_include_relative_to_including_file_and_later_keys_win(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text(yaml.safe_dump({"seed": 1, "trace": {"path": "t.npz"}, "workload": {"batch_size": 2, "max_tokens": 10}}))
    (tmp_path / "sub" / "mid.yaml").write_text(yaml.safe_dump({"include": ["base.yaml"], "seed": 2}))
    (tmp_path / "top.yaml").write_text(yaml.safe_dump({"include": ["sub/mid.yaml"], "workload": {"batch_size": 4}}))
    raw = load_raw(tmp_path / "top.yaml")
    assert raw["seed"] == 2
    assert raw["workload"] == {"batch_size": 4, "max_tokens": 10}
    # the trace path is relative to the file that wrote it
    assert raw["trace"]["path"] == str((tmp_path / "sub" / "t.npz").resolve())


def test_include_cycle_is_an_input_error(tmp_path):
    (tmp_path / "a.yaml").write_text("include: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    with pytest.raises(InputError, match="cycle"):
        load_raw(tmp_path / "a.yaml")


def test_set_kind_rebuilds_block_from_defaults():
    raw = {"policies": {"cache": {"kind": "lru", "capacity_experts": 8, "scope": "per_layer"}}}
    out = apply_overrides(raw, ["policies.cache.kind=streaming", "policies.cache.transient_buffers=3"])
    assert out["policies"]["cache"] == {"kind": "streaming", "transient_buffers": 3}
    out = apply_overrides(raw, ["policies.cache.capacity_experts=16"])
    assert out["policies"]["cache"] == {"kind": "lru", "capacity_experts": 16, "scope": "per_layer"}


def test_set_parses_yaml_values_and_paths_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = apply_overrides({}, ["a.b=3", "a.c=[1, 2]", "a.d=true", "a.e=x", "trace.path=t.npz"])
    assert out["a"] == {"b": 3, "c": [1, 2], "d": True, "e": "x"}
    assert out["trace"]["path"] == str(tmp_path / "t.npz")


def test_set_reaches_every_scenario_field():
    sc = load_scenario(SC / "mixtral-8x7b-h100-lru-c32.yaml", ["model.num_layers=4", "hardware.link.setup_us=3", "runtime.launch_mode=graph", "policies.cache.kind=streaming"])
    assert sc.model.num_layers == 4
    assert sc.hardware.link.setup_us == 3
    assert sc.runtime.launch_mode == "graph"
    assert sc.policies.cache.kind == "streaming"


def test_every_bundled_scenario_validates():
    files = sorted(SC.glob("*.yaml"))
    assert len(files) >= 7
    for f in files:
        sc = load_scenario(f)
        assert sc.name == f.stem, f  # file names say model, hardware and policy


def test_hash_changes_with_trace_bytes_not_path(tmp_path):
    src = ROOT / "traces" / "switch-base-8.npz"
    a = tmp_path / "a"
    a.mkdir()
    shutil.copy(src, a / "t.npz")
    base = SC / "switch-base-8-rtx4090-lru-c16.yaml"
    s1 = load_scenario(base, [f"trace.path={a / 't.npz'}"])
    s2 = load_scenario(base)
    from moesim.traces import trace_sha256 as file_sha256

    h1 = scenario_hash(s1, file_sha256(a / "t.npz"))
    h2 = scenario_hash(s2, file_sha256(src))
    assert h1 == h2  # same bytes, other path
    assert scenario_hash(s1, "0" * 64) != h1
    s3 = load_scenario(base, ["seed=7"])
    assert scenario_hash(s3, file_sha256(src)) != h2


scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=12))
keys = st.sampled_from(["name", "seed", "model", "hardware", "trace", "policies", "workload", "runtime", "include",
                        "preset", "kind", "capacity_experts", "scope", "path", "synthetic", "batch_size", "max_tokens",
                        "hbm_gib", "gpu", "link", "cache", "tokens", "layers", "x"])
trees = st.recursive(scalars, lambda ch: st.one_of(st.lists(ch, max_size=3), st.dictionaries(keys, ch, max_size=4)), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(keys, trees, max_size=6), text=st.text(max_size=60))
def test_fuzzed_scenarios_never_traceback(tmp_path, body, text):
    from moesim.config.loader import load_scenario as load

    p = tmp_path / "fuzz.yaml"
    p.write_text(yaml.safe_dump(body))
    for path in (p,):
        try:
            load(path)
        except InputError:
            pass
    q = tmp_path / "fuzz_text.yaml"
    q.write_text(text)
    try:
        load(q)
    except InputError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(["workload", "policies", "runtime", "trace", "model"]), trees, max_size=3))
def test_fuzzed_overrides_of_a_real_scenario_never_traceback(tmp_path, changes):
    """Mutations of a valid scenario either run or raise InputError (through the whole run)."""
    from moesim.engine.run import simulate

    body = {"include": [str(SC / "switch-base-8-rtx4090-lru-c16.yaml")], **changes}
    p = tmp_path / "mut.yaml"
    p.write_text(yaml.safe_dump(body))
    try:
        sc = load_scenario(p, ["workload.max_tokens=20", "workload.warmup_tokens=0"])
        simulate(sc)
    except InputError:
        pass
