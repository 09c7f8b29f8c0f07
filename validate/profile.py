"""``moesim validate fit``: a measurement folder -> a hardware profile that scenarios can name.

Input: a folder written by ``moesim validate measure`` (or the committed external H100 data,
``validate/measurements/external/h100-sxm``): ``env.json``, ``link.json``, ``expert_gpu.json``,
``expert_cpu.json``. Output, for profile name ``NAME``:

=============================  ===============================================================
``NAME.yaml``                  a full hardware preset (:class:`moesim.hardware.spec.HardwareSpec`
                               mapping): the fitted values of :func:`moesim.hardware.fit.fit_h100`
                               (link rates and setup from copies by size, launch, eager per-op,
                               graph-launch, copy-issue and read-back costs, interference factors,
                               HBM and compute efficiencies, per-kernel fixed time, the CPU expert
                               model, machine facts) over a *base* preset that supplies the
                               spec-sheet numbers (GPU and CPU peaks); every number has a
                               ``sources`` entry
``NAME-bf16-expert.json``      the GPU expert-time table by shape and tokens (``expert_profile``)
``NAME-host-cpu-expert.json``  the CPU expert-time table (``cpu_expert_profile``)
``NAME-spread.json``           the measured timing spread (:mod:`moesim.perf.uncertainty`), which
                               ``moesim run --replicas N`` samples
=============================  ===============================================================

:mod:`moesim.perf.predictor` uses the expert tables whenever a model's expert shape and dtype match a
measured row set; other shapes fall back to the roofline with the fitted efficiencies.

With ``install=True`` the files also go where moesim finds them by name: the YAML into
``moesim/hardware/presets/`` (then ``hardware: {preset: NAME}`` in a scenario) and the tables and
spread into ``moesim/perf/tables/`` (an existing file is replaced only with ``force``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from moesim.errors import InputError
from moesim.hardware import fit as hwfit
from validate.harness import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
GPU_PART_KEYS = {
    "env.json": ("host_overheads", "gemm_bf16"),
    "link.json": ("transfers", "bidirectional_pinned", "concurrent_copy_and_kernel", "expert_sized_h2d_series"),
    "expert_gpu.json": ("rows",),
    "expert_cpu.json": ("rows",),
}
#: which ``moesim validate measure --parts`` writes each key
PART_OF = {"env.json": "any measure run on CUDA", "link.json": "measure part copies",
           "expert_gpu.json": "measure part expert", "expert_cpu.json": "measure part cpu",
           "host_overheads": "measure part launch", "gemm_bf16": "any measure run on CUDA",
           "transfers": "measure part copies", "bidirectional_pinned": "measure part copies",
           "expert_sized_h2d_series": "measure part copies", "concurrent_copy_and_kernel": "measure part interference",
           "rows": ""}


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (sources stay machine-independent)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def check_folder(path: Path) -> dict:
    """The four files of a complete measurement folder, loaded; InputError naming what is missing
    and which measure part writes it."""
    missing = []
    for fname, keys in GPU_PART_KEYS.items():
        f = path / fname
        if not f.is_file():
            missing.append(f"{fname} ({PART_OF[fname]})")
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON ({exc.msg} at line {exc.lineno})", source=str(f)) from None
        for k in keys:
            if not data.get(k):
                missing.append(f"{fname}:{k} ({PART_OF[k] or PART_OF[fname]})")
    if missing:
        raise InputError("the fit needs a complete GPU measurement; missing " + ", ".join(missing), source=str(path))
    m = hwfit.load_measurements(path)
    if not (m["env"].get("device") or {}).get("total_memory") or m["env"].get("_meta", {}).get("emulated"):
        raise InputError("env.json holds no CUDA device (measured on the CPU or with the CPU stand-in): nothing "
                         "to fit a GPU profile to", source=str(path / "env.json"), field="device")
    return m


def _set(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def fit_profile(measurements: str | Path | None = None, *, name: str, base: str | None = None) -> dict:
    """Fit a hardware profile named ``name`` to the measurement folder (default: the committed H100
    data) over hardware preset ``base`` (default: the preset of the measured GPU's kind). Returns
    ``{"hardware": mapping, "tables": {file name: table}, "spread": spread, "diagnostics": ...}``."""
    from moesim.hardware.presets import load_hardware_preset
    from moesim.hardware.spec import HardwareSpec
    from moesim.perf.uncertainty import fit_spread
    from validate.e2e import preset_for

    path = Path(measurements) if measurements is not None else hwfit.default_measurement_dir()
    if not path.is_dir():
        raise InputError("no such measurement folder", source=str(path), field="--measurements")
    m = check_folder(path)
    gpu_name = (m["env"].get("device") or {}).get("name")
    base = base or preset_for(gpu_name)
    raw = copy.deepcopy(load_hardware_preset(base))
    peaks = raw["gpu"]["peak_tflops"]
    peak_kw = {"peak_tflops": float(peaks["bf16"]), "peak_hbm_gb_s": float(raw["gpu"]["hbm_bandwidth_gb_s"]),
               "cpu_peak_gflops_fp32": float(raw["cpu"]["peak_gflops_fp32"]),
               "cpu_peak_gflops_bf16": float(raw["cpu"]["peak_gflops_bf16"])}
    fitted = hwfit.fit_h100(path, **peak_kw)
    report = hwfit.fit_report(path, **peak_kw)
    shown = _shown(path)
    sources = dict(raw.get("sources") or {})
    kept = []
    for key, value in fitted.items():
        if value is None:  # not in this data (e.g. no nvidia-smi): the base preset's value stays
            kept.append(key)
            sources[key] = f"base preset {base} (not measured in {shown}): " + sources.get(key, "")
            continue
        _set(raw, key, value)
        if isinstance(value, bool):  # a model choice, not a number: sources name numbers only
            continue
        text = hwfit.FIT_SOURCES[key].replace(hwfit.MEAS_REL, shown).replace(
            "fit by moesim.hardware.fit", "fit by moesim validate fit")
        sources[key] = text
    host = report["host"]
    if host["graph_launch_measured"]:
        sources["host.graph_launch_us"] = f"{shown}/env.json host_overheads.graph_replay_1_kernel host enqueue median"
    if host["copy_issue_measured"]:
        sources["host.copy_issue_us"] = f"{shown}/env.json host_overheads.h2d_copy_4KiB_pinned_issue host enqueue median"
    gtab = hwfit.expert_gpu_table(path)
    ctab = hwfit.expert_cpu_table(path)
    gname, cname = f"{name}-{gtab['dtype']}", f"{name}-host-cpu"
    for t, what in ((gtab, "expert_gpu.json"), (ctab, "expert_cpu.json")):
        t["source"] = f"{shown}/{what} (medians), extracted by moesim validate fit"
    ctab["device"] = m["expert_cpu"].get("cpu_model", "").split(":", 1)[-1].strip() + \
        f", {ctab['rows'][0]['threads'] if ctab['rows'] else '?'} threads"
    raw["name"] = name
    raw["description"] = (f"{gpu_name or 'GPU'}: fitted by moesim validate fit to {shown}; spec-sheet peaks and "
                          f"anything not measured from preset {base}")
    raw["expert_profile"] = gname
    raw["cpu_expert_profile"] = cname
    raw["sources"] = dict(sorted(sources.items()))
    try:
        HardwareSpec.model_validate(raw)
    except Exception as exc:  # noqa: BLE001 - a fit that breaks the schema is bad input data
        raise InputError(f"fitted profile is not a valid hardware description: {exc}", source=str(path)) from None
    spread = fit_spread(m, hardware=name, source=shown)
    return {
        "name": name,
        "base": base,
        "measurements": shown,
        "hardware": raw,
        "fitted": fitted,
        "kept_from_base": kept,
        "tables": {f"{gname}-expert.json": gtab, f"{cname}-expert.json": ctab},
        "spread": spread,
        "diagnostics": {"check_expert_sized_h2d": report["check_expert_sized_h2d"],
                        "bidirectional": report["bidirectional"], "memory_line_max_rel_err":
                        report["memory"]["max_abs_rel_err"]},
    }


def render_yaml(hardware: dict, measurements: str) -> str:
    """The preset file text: a header comment and the mapping (keys in schema order)."""
    import yaml

    head = (f"# Hardware profile '{hardware['name']}', written by `moesim validate fit` from {measurements}.\n"
            "# Every number's origin is in `sources`. Regenerate rather than edit.\n")
    return head + yaml.safe_dump(hardware, sort_keys=False, default_flow_style=None, width=120)


def profile_files(res: dict) -> dict[str, str]:
    """File name -> text of a fitted profile."""
    from moesim.perf.uncertainty import render_spread

    out = {f"{res['name']}.yaml": render_yaml(res["hardware"], res["measurements"])}
    for fname, table in res["tables"].items():
        out[fname] = hwfit.render_table(table)
    out[f"{res['name']}-spread.json"] = render_spread(res["spread"])
    return out


def write_profile(res: dict, out_dir: str | Path, *, install: bool = False, force: bool = False) -> list[Path]:
    """Write the profile's files into ``out_dir``; with ``install`` also into the package folders
    (``moesim/hardware/presets``, ``moesim/perf/tables``)."""
    files = profile_files(res)
    written = [write_text_atomic(Path(out_dir) / f, t) for f, t in files.items()]
    if install:
        preset_dir = ROOT / "moesim" / "hardware" / "presets"
        targets = {f: (preset_dir if f.endswith(".yaml") else hwfit.table_dir()) / f for f in files}
        clash = [str(p) for p in targets.values() if p.exists()]
        if clash and not force:
            raise InputError("would replace " + ", ".join(clash) + "; pass --force", source="--install")
        written += [write_text_atomic(p, files[f]) for f, p in targets.items()]
    return written
