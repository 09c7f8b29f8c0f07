"""End-to-end comparison: measured offloaded-decode runs against moesim's prediction of each.

For every ``e2e.json`` under a folder (the layout :mod:`validate.e2e` writes: ``e2e.json``,
``trace.npz``, ``scenario.yaml`` per experiment), :func:`e2e_report` takes the moesim scenario the
run recorded (same model shapes, layers, trace rows, batch, warm-up, policy and capacity; the
hardware preset of the measured GPU), runs it, and lists per experiment:

* mean and p90 token latency, measured (host wall clock per decode step, after warm-up) vs simulated
  (``tpot_ms``), and the error of each;
* hits, misses and expert bytes moved host-to-GPU, measured vs simulated (the counts follow the same
  accounting rules, so they should be equal: ``counts_match``);
* with ``replicas`` > 0, the simulated p10/p90 band of mean and p90 token latency over replicas
  (:mod:`moesim.perf.uncertainty`, the hardware's measured spread) and whether the measurement lies
  inside it.

MAPE of mean and of p90 token latency is reported per device kind. Runs on the CPU (``machine.device ==
"cpu"``) are compared with the GPU hardware preset their scenario names: such a row tests the
report's machinery, never the simulator's GPU accuracy, and the report says so in its first lines.
Every figure is recomputed from the ``e2e.json`` files at each call (nothing is stored but them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REPORT_STEM = "e2e-report"


def find_experiments(root: str | Path) -> list[Path]:
    """Folders under ``root`` (or ``root`` itself) holding an ``e2e.json``, sorted by path."""
    r = Path(root)
    if (r / "e2e.json").is_file():
        return [r]
    return sorted(p.parent for p in r.rglob("e2e.json"))


def _err(sim: float, meas: float) -> float:
    return 100.0 * (sim - meas) / meas


def experiment_row(folder: Path, *, replicas: int = 0, spread: dict | None = None, spread_source: str = "",
                   spread_scale: float = 1.0) -> dict:
    """One experiment: measured vs simulated (see the module docstring)."""
    from moesim.config.loader import scenario_from_dict
    from moesim.engine.run import simulate
    from moesim.errors import InputError

    f = folder / "e2e.json"
    try:
        res = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg} at line {exc.lineno})", source=str(f)) from None
    if res.get("kind") != "moesim e2e measurement" or "scenario" not in res:
        raise InputError("not an e2e measurement (expected kind: 'moesim e2e measurement')", source=str(f))
    sc = scenario_from_dict(res["scenario"], source=str(folder / "scenario.yaml"), base_dir=folder)
    sim = simulate(sc, source=str(folder / "scenario.yaml")).summary
    ms, cm = res["summary"], res["counts"]["measured"]
    cfg = res["config"]
    meas_mean, meas_p90 = float(ms["token_latency_ms_mean"]), float(ms["token_latency_ms_p90"])
    sim_mean, sim_p90 = float(sim["tpot_ms"]["mean"]), float(sim["tpot_ms"]["p90"])
    row = {
        "experiment": folder.name,
        "device": res["machine"]["device"],
        "device_name": (res["machine"].get("device_props") or {}).get("name"),
        "model": cfg["model"], "shape": cfg["shape"], "layers": cfg["layers"], "policy": cfg["policy"],
        "capacity": cfg["capacity"], "batch": cfg["batch"], "steps_measured": ms["steps_measured"],
        "hardware_preset": res["scenario"]["hardware"].get("preset"),
        "measured_mean_ms": round(meas_mean, 4), "simulated_mean_ms": round(sim_mean, 4),
        "mean_error_pct": round(_err(sim_mean, meas_mean), 3),
        "measured_p90_ms": round(meas_p90, 4), "simulated_p90_ms": round(sim_p90, 4),
        "p90_error_pct": round(_err(sim_p90, meas_p90), 3),
        "measured_hits": int(cm["hits"]), "simulated_hits": int(sim["cache"]["hits"]),
        "measured_misses": int(cm["misses"]), "simulated_misses": int(sim["cache"]["misses"]),
        "measured_bytes_h2d": int(cm["bytes_h2d_experts"]),
        "simulated_bytes_h2d": int(sim["transfers"]["bytes_h2d_experts"]),
    }
    row["counts_match"] = (row["measured_hits"] == row["simulated_hits"]
                           and row["measured_misses"] == row["simulated_misses"])
    if replicas:
        from moesim.perf.uncertainty import run_replicas, uncertainty_block

        reps = run_replicas(sc, replicas, spread, scale=spread_scale, source=str(folder / "scenario.yaml"))
        b = uncertainty_block(reps, seed=sc.seed, spread_source=spread_source, spread=spread,
                              scale=spread_scale)["bands"]
        bm, bp = b["tpot_mean_ms"], b["tpot_p90_ms"]
        row["band_mean_ms"] = [round(bm["p10"], 4), round(bm["p90"], 4)]
        row["band_p90_ms"] = [round(bp["p10"], 4), round(bp["p90"], 4)]
        row["mean_inside_band"] = bool(bm["p10"] <= meas_mean <= bm["p90"])
        row["p90_inside_band"] = bool(bp["p10"] <= meas_p90 <= bp["p90"])
    return row


def mape(values) -> float | None:
    """Mean of the absolute values of percentage errors (None for no values)."""
    v = [abs(float(x)) for x in values]
    return float(np.mean(v)) if v else None


def e2e_report(root: str | Path, *, replicas: int = 0, spread: str | Path | None = None,
               spread_scale: float = 1.0) -> dict:
    """The end-to-end report of every experiment under ``root``."""
    from moesim.errors import InputError

    folders = find_experiments(root)
    if not folders:
        raise InputError("no e2e.json found (run `moesim validate e2e` or the suite first)", source=str(root),
                         field="--e2e")
    sp, sp_src = None, ""
    rows = []
    for d in folders:
        if replicas:
            from moesim.perf.uncertainty import load_spread

            preset = json.loads((d / "e2e.json").read_text(encoding="utf-8"))["scenario"]["hardware"].get("preset")
            sp, sp_src = load_spread(spread, preset or "")
        rows.append(experiment_row(d, replicas=replicas, spread=sp, spread_source=sp_src, spread_scale=spread_scale))
    devices = sorted({r["device"] for r in rows})
    summary = []
    for dev in devices:
        rs = [r for r in rows if r["device"] == dev]
        entry = {
            "device": dev,
            "experiments": len(rs),
            "mape_mean_pct": round(mape(r["mean_error_pct"] for r in rs), 3),
            "mape_p90_pct": round(mape(r["p90_error_pct"] for r in rs), 3),
            "counts_match": sum(r["counts_match"] for r in rs),
        }
        if replicas:
            entry["mean_inside_band"] = sum(r["mean_inside_band"] for r in rs)
            entry["p90_inside_band"] = sum(r["p90_inside_band"] for r in rs)
        summary.append(entry)
    caveats = []
    if "cpu" in devices:
        caveats.append(
            "CPU runs: these experiments ran on the CPU and are compared with the GPU hardware preset their "
            "scenario names. Their error says nothing about moesim's GPU accuracy; they exercise the comparison.")
    if not any(d == "cuda" for d in devices):
        caveats.append("No GPU end-to-end measurement is in this report.")
    caveats.append("Measured latency is the host wall clock of each decode step (batch rows decoded together); "
                   "simulated latency is moesim's tpot_ms over the same measured steps.")
    return {"kind": "moesim end-to-end report", "experiments_root": str(root), "replicas": replicas,
            "spread_scale": spread_scale, "summary": summary, "rows": rows, "caveats": caveats}


def exceeding(report: dict, fail_above_pct: float) -> list[dict]:
    """Summary entries whose mean-latency MAPE exceeds ``fail_above_pct``."""
    return [s for s in report["summary"] if s["mape_mean_pct"] > fail_above_pct]


# ----- rendering -------------------------------------------------------------------------------------
def summary_table(report: dict) -> str:
    """MAPE per device kind, Markdown."""
    band = report["replicas"] > 0
    head = "| device | experiments | MAPE mean % | MAPE p90 % | counts equal |" + (
        " mean in band | p90 in band |" if band else "")
    lines = [head, "|---|---:|---:|---:|---:|" + ("---:|---:|" if band else "")]
    for s in report["summary"]:
        line = (f"| {s['device']} | {s['experiments']} | {s['mape_mean_pct']:.2f} | {s['mape_p90_pct']:.2f} | "
                f"{s['counts_match']}/{s['experiments']} |")
        if band:
            line += f" {s['mean_inside_band']}/{s['experiments']} | {s['p90_inside_band']}/{s['experiments']} |"
        lines.append(line)
    return "\n".join(lines)


def rows_table(report: dict) -> str:
    """One line per experiment, Markdown."""
    band = report["replicas"] > 0
    head = ("| experiment | device | policy | cap | mean ms meas / sim | err % | p90 ms meas / sim | err % | "
            "hits meas / sim | misses meas / sim | MB H2D meas / sim |")
    sep = "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if band:
        head += " mean band (p10-p90) | in |"
        sep += "---:|---|"
    lines = [head, sep]
    for r in report["rows"]:
        line = (f"| {r['experiment']} | {r['device']} | {r['policy']} | {r['capacity'] if r['capacity'] is not None else '–'} "
                f"| {r['measured_mean_ms']:.3f} / {r['simulated_mean_ms']:.3f} | {r['mean_error_pct']:+.1f} "
                f"| {r['measured_p90_ms']:.3f} / {r['simulated_p90_ms']:.3f} | {r['p90_error_pct']:+.1f} "
                f"| {r['measured_hits']} / {r['simulated_hits']} | {r['measured_misses']} / {r['simulated_misses']} "
                f"| {r['measured_bytes_h2d'] / 1e6:.2f} / {r['simulated_bytes_h2d'] / 1e6:.2f} |")
        if band:
            lo, hi = r["band_mean_ms"]
            line += f" {lo:.3f}-{hi:.3f} | {'yes' if r['mean_inside_band'] else 'no'} |"
        lines.append(line)
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """The report as Markdown."""
    out = ["# moesim end-to-end report", ""]
    out += [f"> {c}" for c in report["caveats"] if c.startswith(("CPU", "No GPU"))] + [""]
    out += [f"Experiments: `{report['experiments_root']}`. Error = (simulated - measured) / measured. "
            "Regenerate with `moesim validate compare --e2e DIR`.", "", "## MAPE", "", summary_table(report), "",
            "## Experiments", "", rows_table(report), "", "## Caveats", ""]
    out += [f"* {c}" for c in report["caveats"]]
    return "\n".join(out) + "\n"


def figure(report: dict):
    """Plotly figure: measured vs simulated mean and p90 token latency per experiment."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = report["rows"]
    names = [f"{r['experiment']} ({r['device']})" for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["mean token latency (ms)", "p90 token latency (ms)"])
    for col, key in ((1, "mean"), (2, "p90")):
        fig.add_trace(go.Bar(name="measured", x=names, y=[r[f"measured_{key}_ms"] for r in rows],
                             marker_color="#1f77b4", showlegend=col == 1), row=1, col=col)
        err = None
        if report["replicas"]:
            sims = [r[f"simulated_{key}_ms"] for r in rows]
            bands = [r[f"band_{key}_ms"] for r in rows]
            err = {"type": "data", "symmetric": False, "array": [b[1] - s for s, b in zip(sims, bands)],
                   "arrayminus": [s - b[0] for s, b in zip(sims, bands)]}
        fig.add_trace(go.Bar(name="moesim", x=names, y=[r[f"simulated_{key}_ms"] for r in rows],
                             marker_color="#d62728", error_y=err, showlegend=col == 1), row=1, col=col)
    title = "moesim end-to-end report: measured vs simulated"
    if any(r["device"] == "cpu" for r in rows):
        title += " (CPU runs: not a GPU accuracy figure)"
    fig.update_layout(title=title, barmode="group", height=480, width=1200, template="plotly_white")
    return fig


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write ``e2e-report.json``, ``.md`` and ``.html`` into ``out_dir`` (each atomically)."""
    from validate.compare import render_json, write_report_files

    return write_report_files(out_dir, REPORT_STEM, render_json(report), render_markdown(report), figure(report))
