"""Loading a scenario: YAML with ``include:``, ``--set`` overrides, presets, validation, hashing.

Pipeline: read the file (``yaml.safe_load``), resolve its ``include:`` list depth-first (paths relative
to the file that names them; the including file wins; mappings merge deeply, lists are replaced),
make relative ``trace.path`` values absolute against the file that wrote them, apply ``--set``
overrides (relative paths against the current directory), expand ``model.preset`` and
``hardware.preset`` (scenario fields override preset fields), then validate with pydantic.
Every user mistake becomes one :class:`~moesim.errors.InputError` naming the file and field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from moesim.errors import InputError, pydantic_error_line

MAX_INCLUDE_DEPTH = 16
MAX_YAML_BYTES = 4 * 2**20


def read_yaml(path: str | Path) -> dict:
    """Read one YAML mapping with ``yaml.safe_load``; errors name the file."""
    p = Path(path)
    src = str(path)
    if not p.is_file():
        raise InputError("file not found", source=src)
    if p.stat().st_size > MAX_YAML_BYTES:
        raise InputError(f"file larger than {MAX_YAML_BYTES} bytes", source=src)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise InputError(f"{where}{problem}", source=src) from None
    except UnicodeDecodeError:
        raise InputError("not a UTF-8 text file", source=src) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"expected a mapping at the top level, got {type(data).__name__}", source=src)
    for k in data:
        if not isinstance(k, str):
            raise InputError(f"top-level key {k!r} is not a string", source=src)
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: mappings merge recursively, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def merge_scenarios(base: dict, over: dict) -> dict:
    """:func:`deep_merge` for scenario mappings, except that a ``policies.<family>`` block whose
    ``kind`` differs from the included one replaces it (a new kind starts from its own defaults)."""
    out = deep_merge(base, over)
    bp, op = base.get("policies"), over.get("policies")
    if isinstance(bp, dict) and isinstance(op, dict):
        for fam, block in op.items():
            old = bp.get(fam)
            if isinstance(block, dict) and isinstance(old, dict) and "kind" in block and block["kind"] != old.get("kind"):
                out["policies"][fam] = copy.deepcopy(block)
    return out


def _absolutise_paths(data: dict, base_dir: Path) -> None:
    trace = data.get("trace")
    if isinstance(trace, dict) and isinstance(trace.get("path"), str):
        p = Path(trace["path"]).expanduser()
        if not p.is_absolute():
            trace["path"] = str((base_dir / p).resolve())
    arr = _arrival_block(data)
    if arr is not None and isinstance(arr.get("path"), str):
        p = Path(arr["path"]).expanduser()
        if not p.is_absolute():
            arr["path"] = str((base_dir / p).resolve())


def _arrival_block(data: dict) -> dict | None:
    """``workload.requests.arrival`` of a raw mapping (its ``path`` is a file), or None."""
    wl = data.get("workload")
    req = wl.get("requests") if isinstance(wl, dict) else None
    arr = req.get("arrival") if isinstance(req, dict) else None
    return arr if isinstance(arr, dict) else None


def load_raw(path: str | Path, _stack: tuple = ()) -> dict:
    """The merged raw mapping of ``path`` and everything it includes."""
    p = Path(path).resolve()
    if p in _stack:
        raise InputError("include cycle: " + " -> ".join(str(s) for s in _stack + (p,)), source=str(path))
    if len(_stack) > MAX_INCLUDE_DEPTH:
        raise InputError("includes nested too deeply", source=str(path))
    data = read_yaml(path)
    _absolutise_paths(data, p.parent)
    includes = data.pop("include", None)
    if includes is None:
        return data
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise InputError("expected a list of file paths", source=str(path), field="include")
    merged: dict = {}
    for inc in includes:
        inc_path = Path(inc).expanduser()
        if not inc_path.is_absolute():
            inc_path = p.parent / inc_path
        if not inc_path.is_file():
            raise InputError(f"included file {inc!r} not found (looked at {inc_path})", source=str(path), field="include")
        merged = merge_scenarios(merged, load_raw(inc_path, _stack + (p,)))
    return merge_scenarios(merged, data)


# ----- --set overrides ----------------------------------------------------------------------------
def parse_set(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    if "=" not in item:
        raise InputError(f"expected key.path=value, got {item!r}", source="--set")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise InputError(f"bad key path {key!r}", source="--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise InputError(f"value {raw!r} is not a YAML scalar or list", source="--set", field=key) from None
    return key.split("."), value


def apply_overrides(data: dict, sets: Iterable[str]) -> dict:
    """Apply ``--set`` items. Setting ``policies.<family>.kind`` replaces that block with the new
    kind's defaults before the other items for the block apply."""
    out = copy.deepcopy(data)
    parsed = [parse_set(s) for s in sets]
    # kind changes first
    for keys, value in parsed:
        if len(keys) == 3 and keys[0] == "policies" and keys[2] == "kind":
            out.setdefault("policies", {})
            if not isinstance(out["policies"], dict):
                out["policies"] = {}
            out["policies"][keys[1]] = {"kind": value}
    for keys, value in parsed:
        if len(keys) == 3 and keys[0] == "policies" and keys[2] == "kind":
            continue
        if keys in (["trace", "path"], ["workload", "requests", "arrival", "path"]) and isinstance(value, str):
            value = str(Path(value).expanduser().resolve())
        if keys[:1] == ["trace"] and keys[1:2] in (["path"], ["synthetic"]):
            # choosing one trace source drops the other
            other = "synthetic" if keys[1] == "path" else "path"
            if isinstance(out.get("trace"), dict):
                out["trace"].pop(other, None)
        node = out
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if not isinstance(nxt, dict):
                nxt = {}
                node[k] = nxt
            node = nxt
        node[keys[-1]] = value
    return out


# ----- presets ---------------------------------------------------------------------------------------
def expand_presets(data: dict, source: str) -> dict:
    """Replace ``model.preset`` / ``hardware.preset`` / ``cluster.preset`` by the preset's fields,
    scenario fields winning."""
    out = dict(data)
    for block in ("model", "hardware", "cluster"):
        spec = out.get(block)
        if isinstance(spec, str):  # shorthand: model: mixtral-8x7b
            spec = {"preset": spec}
        if isinstance(spec, dict) and "preset" in spec:
            spec = dict(spec)
            name = spec.pop("preset")
            if not isinstance(name, str):
                raise InputError("expected a preset name (string)", source=source, field=f"{block}.preset")
            if block == "model":
                from moesim.models.presets import load_model_preset as loader
            elif block == "cluster":
                from moesim.network.cluster import load_cluster_preset as loader
            else:
                from moesim.hardware.presets import load_hardware_preset as loader
            try:
                base = loader(name)
            except InputError as e:
                raise e.with_context(source=source) from None
            out[block] = deep_merge(base, spec)
        elif spec is not None:
            out[block] = spec
    return out


def validate_scenario(data: dict, source: str):
    """Validate a raw mapping into the Scenario model; one line on error."""
    from moesim.config.schema import scenario_model

    model = scenario_model()
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise pydantic_error_line(exc, source=source) from None


def load_scenario(path: str | Path, sets: Iterable[str] = (), seed: int | None = None):
    """Load, merge, override, expand presets and validate the scenario at ``path``."""
    src = str(path)
    raw = load_raw(path)
    raw = apply_overrides(raw, list(sets))
    if seed is not None:
        raw["seed"] = seed
    if "name" not in raw:
        raw["name"] = Path(path).stem
    raw = expand_presets(raw, src)
    return validate_scenario(raw, src)


def scenario_from_dict(data: dict, source: str = "<scenario>", base_dir: str | Path | None = None):
    """Validate a scenario given as a mapping (dashboard, tests); relative trace paths resolve
    against ``base_dir`` (default: the current directory)."""
    raw = copy.deepcopy(data)
    raw.pop("include", None)
    _absolutise_paths(raw, Path(base_dir or os.getcwd()))
    raw = expand_presets(raw, source)
    return validate_scenario(raw, source)


# ----- hashing --------------------------------------------------------------------------------------
def resolved_dict(scenario) -> dict:
    """The fully resolved scenario as plain JSON-able data (what ``scenario.resolved.yaml`` holds).
    The multi-GPU blocks are left out when unused (None)."""
    d = scenario.model_dump(mode="json")
    for k in ("cluster", "parallel"):
        if d.get(k) is None:
            d.pop(k, None)
    pol = d.get("policies") or {}
    for k in ("placement", "alltoall", "batching"):
        if pol.get(k, 0) is None:
            pol.pop(k)
    wl = d.get("workload") or {}
    if wl.get("requests", 0) is None:  # serving block unused: old scenario hashes unchanged
        wl.pop("requests")
    elif wl["requests"].get("cluster_table_tokens", 0) is None:  # default grid: old hashes unchanged
        wl["requests"].pop("cluster_table_tokens")
    md = d.get("model") or {}
    if md.get("expert_size_multipliers", 0) is None:  # equal experts: old scenario hashes unchanged
        md.pop("expert_size_multipliers")
    return d


def scenario_hash(scenario, trace_sha256: str | None) -> str:
    """sha256 of the canonical JSON of the resolved scenario (sorted keys, seed included) together
    with the trace file's sha256. The trace's path is left out of the JSON: a trace is identified by
    its bytes, so the same scenario in two checkouts hashes the same."""
    d = resolved_dict(scenario)
    if isinstance(d.get("trace"), dict) and d["trace"].get("path") is not None:
        d["trace"]["path"] = "<by-content>"
    arr = _arrival_block(d)
    if arr is not None and isinstance(arr.get("path"), str):  # an arrival file, also by its bytes
        from moesim.traces.format import trace_sha256 as file_sha256

        p = Path(arr["path"])
        arr["path"] = "sha256:" + (file_sha256(p) if p.is_file() else "missing")
    canon = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    h = hashlib.sha256(canon.encode())
    h.update(b"\0trace:")
    h.update((trace_sha256 or "none").encode())
    return h.hexdigest()
