"""Component comparison: moesim's hardware models against committed component measurements.

:func:`component_report` predicts, with the models the simulator uses, every component timing in a
measurement folder laid out like ``validate/measurements/external/h100-sxm/`` and lists measured vs
predicted with the relative error per row and the mean absolute percentage error (MAPE) per
component:

* ``expert_gpu_graph``: one SwiGLU expert's GPU time per shape and token count, the predictor's
  roofline (:class:`moesim.perf.predictor.Predictor` with ``expert_profile`` disabled, i.e. the
  fitted efficiencies and per-kernel fixed time), vs ``expert_gpu.json`` ``graph_us``;
* ``expert_gpu_eager``: the same calls enqueued eagerly back to back, the engine's launch closed
  form (``moesim.engine.single_gpu``: ``end = max(start + G, h0 + n*lam + G/n)``, first kernel after
  one launch) for 5 kernels at the host's per-op cost (``host.eager_op_us``, else ``launch_us``)
  with G the roofline time, iterated over a chain of calls as the engine would; the steady-state
  time per call vs ``eager_us``;
* ``h2d_pinned`` / ``d2h_pinned`` / ``h2d_pageable`` / ``d2h_pageable``: copy times by size from
  :class:`moesim.hardware.links.LinkModel` vs ``link.json`` event-time medians;
* ``h2d_expert_series``: 352,321,536-byte (one Mixtral expert) back-to-back pinned copies;
* ``cpu_expert_bf16`` / ``cpu_expert_fp32``: the predictor's CPU model (``cpu_expert_profile``
  disabled: call overhead + weight passes over DRAM + arithmetic, see
  :func:`moesim.hardware.fit.fit_cpu_expert`) vs ``expert_cpu.json``.

Some parameters were fitted on this same data (:mod:`moesim.hardware.fit`); those rows are marked
``in_sample`` and their low error is a consistency check of the fit, not a validation.

:func:`write_report` writes ``component-report.{json,md,html}`` atomically. The JSON holds no
timestamps or absolute paths, so a test can recompute it from the committed measurements.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moesim.hardware.fit import (
    CPU_FIT_SHAPE,
    EAGER_FIT_SHAPES,
    MEAS_REL,
    MEMORY_BOUND_MAX_TOKENS,
    cpu_fit_in_sample,
    eager_fit_shapes,
    load_measurements,
)
from moesim.hardware.links import LinkModel
from moesim.hardware.presets import load_hardware_preset
from moesim.hardware.spec import HardwareSpec
from moesim.models.spec import ModelSpec
from moesim.perf.predictor import Predictor
from validate.harness import write_text_atomic

DEFAULT_PRESET = "h100-sxm-pcie5"
EAGER_KERNELS = 5
#: calls in the simulated eager chain (the closed form settles after the first call)
EAGER_CHAIN = 20
REPORT_STEM = "component-report"

_DTYPES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}

#: what each component compares, what it is in-sample for, and its unit
COMPONENTS: dict[str, dict] = {
    "expert_gpu_graph": {
        "title": "GPU expert time (CUDA graph), roofline",
        "unit": "us",
        "model": "Predictor roofline: max(flops/(989.4e12*compute_efficiency), bytes/(3350e9*memory_efficiency)) "
                 "+ 5*kernel_fixed_us; measured profile table disabled",
        "in_sample": f"memory_efficiency and kernel_fixed_us were fitted to the rows with <= "
                     f"{MEMORY_BOUND_MAX_TOKENS} tokens of all four shapes (in-sample); larger token "
                     "counts depend on compute_efficiency, fitted to a separate 8192^3 GEMM (out-of-sample)",
    },
    "expert_gpu_eager": {
        "title": "GPU expert time (eager, back to back), engine launch closed form",
        "unit": "us",
        "model": "engine closed form end = max(start + G, h0 + n*lam + G/n), n = 5 kernels, lam = "
                 "host.eager_op_us (the host's cost per op of an eager call: Python, dispatcher, output "
                 "allocation, launch), G = roofline graph time; steady-state time per call of a chain of calls",
        "in_sample": f"host.eager_op_us was fitted to the launch-bound eager rows of {' and '.join(EAGER_FIT_SHAPES)} "
                     "(all their rows in-sample); G carries the graph fit, so every <= "
                     f"{MEMORY_BOUND_MAX_TOKENS}-token row is in-sample too; the out-of-sample rows are the other "
                     "shapes' larger token counts",
    },
    "h2d_pinned": {
        "title": "H2D copy, pinned",
        "unit": "us",
        "model": "LinkModel: setup_us + bytes / h2d_bandwidth",
        "in_sample": "setup_us and the pinned rates were fitted to these same transfers (in-sample)",
    },
    "d2h_pinned": {
        "title": "D2H copy, pinned",
        "unit": "us",
        "model": "LinkModel: setup_us + bytes / d2h_bandwidth",
        "in_sample": "setup_us and the pinned rates were fitted to these same transfers (in-sample)",
    },
    "h2d_pageable": {
        "title": "H2D copy, pageable",
        "unit": "us",
        "model": "LinkModel: setup_us + bytes / pageable table rate (log-log interpolated)",
        "in_sample": "the pageable table holds one rate per measured size, derived from these medians: "
                     "the error is only rounding (identity check, in-sample)",
    },
    "d2h_pageable": {
        "title": "D2H copy, pageable",
        "unit": "us",
        "model": "LinkModel: setup_us + bytes / pageable table rate (log-log interpolated)",
        "in_sample": "the pageable table holds one rate per measured size, derived from these medians: "
                     "the error is only rounding (identity check, in-sample)",
    },
    "h2d_expert_series": {
        "title": "H2D copy of one Mixtral expert (352,321,536 B), back to back",
        "unit": "ms",
        "model": "LinkModel pinned H2D",
        "in_sample": "separate series, not used by the fit (out-of-sample), but the same link and size "
                     "range as the fitted pinned transfers",
    },
    "cpu_expert_bf16": {
        "title": "CPU expert time, bf16, 16 threads",
        "unit": "ms",
        "model": "Predictor CPU model: call_overhead + weight_passes[bf16] * expert_bytes / dram_bandwidth + "
                 "flops / (peak_gflops_bf16 * compute_efficiency) (no overlap); measured CPU table disabled",
        "in_sample": f"weight_passes[bf16] was fitted to the {CPU_FIT_SHAPE} bf16 rows (in-sample); the other "
                     "shape's bf16 rows are out-of-sample (call overhead, DRAM rate and efficiency come from "
                     "fp32 rows); peak_gflops_bf16 is an assumption (AMX)",
    },
    "cpu_expert_fp32": {
        "title": "CPU expert time, fp32, 16 threads",
        "unit": "ms",
        "model": "Predictor CPU model: call_overhead + expert_bytes / dram_bandwidth + flops / "
                 "(peak_gflops_fp32 * compute_efficiency) (no overlap); measured CPU table disabled",
        "in_sample": "call_overhead_us and dram_bandwidth_gb_s were fitted to the 1-token rows of both shapes, "
                     f"compute_efficiency to the {CPU_FIT_SHAPE} rows (in-sample); the other shape's 2-32 "
                     "token rows are out-of-sample",
    },
}

CAVEATS = [
    (
        "No end-to-end measurements exist yet: this component table is the report. Still to be measured on "
        "a GPU: offloaded decode runs of a real MoE (all resident, LRU at several capacities, oracle "
        "prefetch, streaming, Fiddler-style CPU execution) to compare token latency, hits and bytes."
    ),
    (
        "Rows marked in_sample were used to fit the parameter they test; their low error is a consistency "
        "check of the fit, not a validation."
    ),
    (
        "The measured eager_us is the time per call of eager calls enqueued back to back; the prediction is "
        "the steady state of the engine's closed form over a chain of calls, i.e. max(G, 5*eager_op_us). "
        "eager_op_us (about 23 us) is about twice the bare kernel enqueue of the launch microbenchmark "
        "(host.launch_us, 11.7 us): the rest is framework work per op that the microbenchmark does not do; "
        "one cost for all five ops, so GEMM/element-wise differences are lost. The eager medians of one "
        "shape jump between about 75 and 160 us from one token count to the next (host noise), which no "
        "per-op cost can follow."
    ),
    (
        "The simulator normally uses the measured expert tables (moesim/perf/tables) for these shapes on the "
        "H100 preset; this report disables them to test the roofline that covers every other shape."
    ),
    (
        "All measurements come from one machine (H100 SXM, PCIe Gen5 x16, a 16-vCPU VM); medians only, the "
        "spread of the measurements is not compared."
    ),
]


def default_measurement_dir() -> Path:
    """The committed H100 measurement folder, located via the installed ``validate`` package
    (independent of the working directory)."""
    return Path(__file__).resolve().parent / "measurements" / "external" / "h100-sxm"


def _expert_model(shape: str, h: int, f: int, dtype: str = "bf16") -> ModelSpec:
    """A one-layer ModelSpec whose routed expert is the SwiGLU expert of shape ``h`` x ``f``."""
    return ModelSpec(
        name=f"expert-{shape}", num_layers=1, hidden_size=h, vocab_size=32000, num_experts=8, top_k=2,
        moe_intermediate_size=f, ffn_gated=True, attention={"num_heads": 8}, dtype=dtype,
    )


def _hardware(preset: str) -> HardwareSpec:
    """The preset with its measured expert tables disabled (pure roofline models)."""
    raw = dict(load_hardware_preset(preset))
    raw["expert_profile"] = None
    raw["cpu_expert_profile"] = None
    return HardwareSpec.model_validate(raw)


def eager_time_per_call_s(G: float, launch_s: float, kernels: int = EAGER_KERNELS,
                          calls: int = EAGER_CHAIN) -> float:
    """Steady-state seconds per call of ``calls`` eager calls of ``kernels`` equal kernels (GPU time
    ``G`` per call) launched back to back, with the engine's closed form: a call launched from host
    time ``h0`` starts at ``max(gpu free, h0 + lam)`` and ends at ``max(start + G, h0 + n*lam + G/n)``;
    the host moves on to ``h0 + n*lam``."""
    host = gpu = 0.0
    ends = []
    for _ in range(calls):
        h0 = host
        start = max(gpu, h0 + launch_s)
        end = max(start + G, h0 + kernels * launch_s + G / kernels)
        host = h0 + kernels * launch_s
        gpu = end
        ends.append(end)
    return ends[-1] - ends[-2]


def _row(component: str, case: str, measured: float, predicted: float, in_sample: bool) -> dict:
    return {
        "component": component,
        "case": case,
        "measured": round(float(measured), 4),
        "predicted": round(float(predicted), 4),
        "error_pct": round(100.0 * (float(predicted) - float(measured)) / float(measured), 3),
        "in_sample": bool(in_sample),
    }


def _size(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def component_rows(measurements_dir: str | Path | None = None, preset: str = DEFAULT_PRESET) -> list[dict]:
    """All comparison rows (see the module docstring), in a fixed order."""
    m = load_measurements(measurements_dir if measurements_dir is not None else default_measurement_dir())
    hw = _hardware(preset)
    rows: list[dict] = []

    # (a) + (b): GPU expert, graph and eager
    gpu_rows = sorted(m["expert_gpu"]["rows"], key=lambda r: (r["shape"], r["tokens"]))
    dtype = _DTYPES.get(m["expert_gpu"].get("dtype", "bfloat16"), "bf16")
    launch_s = hw.host.op_launch_us * 1e-6  # what the engine charges per eagerly launched kernel
    eager_shapes = eager_fit_shapes(m["expert_gpu"])
    eager = []
    for r in gpu_rows:
        pred = Predictor(_expert_model(r["shape"], r["h"], r["f"], dtype), hw)
        G = float(pred.expert_times([r["tokens"]], kernels=EAGER_KERNELS)[0][0])
        case = f"{r['shape']} n={r['tokens']}"
        ins = r["tokens"] <= MEMORY_BOUND_MAX_TOKENS
        rows.append(_row("expert_gpu_graph", case, r["graph_us"]["median"], G * 1e6, ins))
        eager.append(_row("expert_gpu_eager", case, r["eager_us"]["median"],
                          eager_time_per_call_s(G, launch_s) * 1e6, ins or r["shape"] in eager_shapes))
    rows += eager

    # (c) copies by size
    link = LinkModel(hw)
    transfers = sorted(m["link"]["transfers"], key=lambda t: (t["mode"], t["direction"], t["bytes"]))
    for mode in ("pinned", "pageable"):
        for direction in ("H2D", "D2H"):
            for t in transfers:
                if t["mode"] != mode or t["direction"] != direction:
                    continue
                p = link.duration_s(t["bytes"], direction.lower(), pinned=(mode == "pinned"))
                rows.append(_row(f"{direction.lower()}_{mode}", _size(t["bytes"]),
                                 t["event_ms"]["median"] * 1e3, p * 1e6, True))

    # (d) expert-sized H2D series
    s = m["link"]["expert_sized_h2d_series"]
    p_ms = link.duration_s(s["bytes"], "h2d", pinned=True) * 1e3
    for key in sorted(k for k, v in s.items() if isinstance(v, dict) and "ms" in v):
        rows.append(_row("h2d_expert_series", f"{key} {s['bytes']} B", s[key]["ms"]["median"], p_ms, False))

    # (e) CPU expert
    cpu_rows = sorted(m["expert_cpu"]["rows"], key=lambda r: (r["dtype"], r["shape"], r["tokens"]))
    for dt in ("bf16", "fp32"):
        for r in cpu_rows:
            if _DTYPES.get(r["dtype"], r["dtype"]) != dt:
                continue
            pred = Predictor(_expert_model(r["shape"], r["h"], r["f"], dt), hw)
            t_ms = float(pred.cpu_expert_times([r["tokens"]])[0]) * 1e3
            used = cpu_fit_in_sample(r, m["expert_cpu"])  # the rows moesim.hardware.fit's CPU fit used
            rows.append(_row(f"cpu_expert_{dt}", f"{r['shape']} n={r['tokens']}", r["ms"]["median"], t_ms, used))
    return rows


def mape(rows: list[dict]) -> float:
    """Mean absolute percentage error of ``rows`` (from their measured and predicted values)."""
    return float(np.mean([abs(r["predicted"] - r["measured"]) / abs(r["measured"]) * 100.0 for r in rows]))


def component_report(measurements_dir: str | Path | None = None, preset: str = DEFAULT_PRESET) -> dict:
    """The component comparison: rows, a MAPE per component (all rows, and out-of-sample rows
    only), what was fitted on the same data, and caveats."""
    rows = component_rows(measurements_dir, preset)
    summary = []
    for comp, info in COMPONENTS.items():
        rs = [r for r in rows if r["component"] == comp]
        if not rs:
            continue
        oos = [r for r in rs if not r["in_sample"]]
        summary.append({
            "component": comp,
            "title": info["title"],
            "unit": info["unit"],
            "rows": len(rs),
            "mape_pct": round(mape(rs), 3),
            "max_abs_error_pct": round(max(abs(r["error_pct"]) for r in rs), 3),
            "out_of_sample_rows": len(oos),
            "out_of_sample_mape_pct": round(mape(oos), 3) if oos else None,
            "model": info["model"],
            "in_sample_note": info["in_sample"],
        })
    src = MEAS_REL if measurements_dir is None else str(measurements_dir)
    return {
        "kind": "moesim component report",
        "measurements": src,
        "preset": preset,
        "end_to_end": None,
        "summary": summary,
        "rows": rows,
        "caveats": CAVEATS,
    }


def exceeding(report: dict, fail_above_pct: float) -> list[dict]:
    """Summary entries whose MAPE exceeds ``fail_above_pct``."""
    return [s for s in report["summary"] if s["mape_pct"] > fail_above_pct]


# ----- rendering -----------------------------------------------------------------------------------
def summary_table(report: dict) -> str:
    """The MAPE summary as a Markdown table."""
    lines = ["| component | unit | rows | MAPE % | max abs err % | out-of-sample rows | out-of-sample MAPE % |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for s in report["summary"]:
        oos = "–" if s["out_of_sample_mape_pct"] is None else f"{s['out_of_sample_mape_pct']:.2f}"
        lines.append(f"| {s['component']} | {s['unit']} | {s['rows']} | {s['mape_pct']:.2f} | "
                     f"{s['max_abs_error_pct']:.2f} | {s['out_of_sample_rows']} | {oos} |")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """The report as Markdown: summary, per-component tables, caveats."""
    out = [
        "# moesim component report",
        "",
        (
            f"Measurements: `{report['measurements']}`; hardware preset `{report['preset']}` with the measured "
            "expert tables disabled (roofline models). Error = (predicted - measured) / measured. "
            "Regenerate with `moesim validate compare`."
        ),
        "",
        "## MAPE per component",
        "",
        summary_table(report),
        "",
        "## What was fitted on this data",
        "",
    ]
    for s in report["summary"]:
        out.append(f"* **{s['component']}**: {s['in_sample_note']}.")
    out += ["", "## Caveats", ""] + [f"* {c}" for c in report["caveats"]]
    for s in report["summary"]:
        out += ["", f"## {s['component']}: {s['title']}", "", f"Model: {s['model']}.", "",
                f"| case | measured ({s['unit']}) | predicted ({s['unit']}) | error % | in-sample |",
                "|---|---:|---:|---:|---|"]
        for r in report["rows"]:
            if r["component"] == s["component"]:
                out.append(f"| {r['case']} | {r['measured']:.4g} | {r['predicted']:.4g} | "
                           f"{r['error_pct']:+.2f} | {'yes' if r['in_sample'] else 'no'} |")
    return "\n".join(out) + "\n"


def figure(report: dict):
    """Plotly figure: predicted vs measured (log-log) per component, with the y = x line."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    comps = [s for s in report["summary"]]
    ncol = 3
    nrow = (len(comps) + ncol - 1) // ncol
    fig = make_subplots(rows=nrow, cols=ncol, subplot_titles=[
        f"{s['component']} (MAPE {s['mape_pct']:.1f}%)" for s in comps])
    for i, s in enumerate(comps):
        rs = [r for r in report["rows"] if r["component"] == s["component"]]
        row, col = i // ncol + 1, i % ncol + 1
        xs = [r["measured"] for r in rs]
        ys = [r["predicted"] for r in rs]
        lo, hi = min(xs + ys), max(xs + ys)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dot", "color": "gray"},
                                 showlegend=False, hoverinfo="skip"), row=row, col=col)
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=s["component"], showlegend=False,
            marker={"color": ["#1f77b4" if r["in_sample"] else "#d62728" for r in rs]},
            text=[f"{r['case']}: {r['error_pct']:+.1f}%" for r in rs], hoverinfo="text+x+y"),
            row=row, col=col)
        fig.update_xaxes(type="log", title_text=f"measured ({s['unit']})", row=row, col=col)
        fig.update_yaxes(type="log", title_text=f"predicted ({s['unit']})", row=row, col=col)
    fig.update_layout(title="moesim component report: predicted vs measured (blue in-sample, red out-of-sample)",
                      height=330 * nrow, width=1200, template="plotly_white")
    return fig


def render_json(report: dict) -> str:
    """The committed JSON text of a report."""
    return json.dumps(report, indent=1, ensure_ascii=False) + "\n"


def write_report_files(out_dir: str | Path, stem: str, json_text: str, markdown: str, fig) -> list[Path]:
    """Write ``<stem>.json``, ``.md`` and ``.html`` (the plotly ``fig``) into ``out_dir``, each
    atomically; the paths in that order. Shared by the component and the end-to-end reports."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.{ext}" for ext in ("json", "md", "html")]
    html = fig.to_html(include_plotlyjs="cdn", full_html=True)
    for p, text in zip(paths, (json_text, markdown, html)):
        write_text_atomic(p, text)
    return paths


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write ``component-report.json``, ``.md`` and ``.html`` into ``out_dir`` (each atomically)."""
    return write_report_files(out_dir, REPORT_STEM, render_json(report), render_markdown(report), figure(report))
