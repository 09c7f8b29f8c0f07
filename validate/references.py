"""Published reference points: end-to-end figures of modelled systems against moesim's prediction.

``validate/references.yaml`` lists figures that papers and projects published (hardware, model,
batch, the figure, where it is written) with a matching moesim scenario and the caveats.
:func:`reference_rows` simulates each scenario and :func:`render_markdown` writes
``validate/reports/reference-points.md`` (``moesim validate references``). The report holds no
timestamps or paths, so a test can check the committed file equals a regeneration.

The comparison is in milliseconds per decode token (a tokens/s figure of one sequence is 1000 / it):
``ratio = moesim / published``; above 1 moesim predicts slower than published, below 1 faster.
Nothing is fitted to these figures.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml

from validate.harness import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = Path(__file__).resolve().parent / "references.yaml"
REPORT = Path(__file__).resolve().parent / "reports" / "reference-points.md"
DEFAULT_WORKLOAD = {"batch_size": 1, "max_tokens": 160, "warmup_tokens": 32, "context_tokens": 512}
DEFAULT_RUNTIME = {"launch_mode": "eager", "wait_for_router": True, "host_memory": "pinned"}


def load_references(path: str | Path | None = None) -> list[dict]:
    """The entries of ``references.yaml``."""
    data = yaml.safe_load(Path(path or REFERENCES).read_text(encoding="utf-8"))
    return list(data["references"])


def scenario_of(entry: dict) -> dict:
    """The full scenario dict of an entry (name, default workload and runtime filled in)."""
    sc = copy.deepcopy(entry["scenario"])
    sc.setdefault("name", "ref-" + entry["id"])
    sc.setdefault("description", f"reference point {entry['id']}: {entry['system']} ({entry['source']['url']})")
    sc.setdefault("workload", dict(DEFAULT_WORKLOAD))
    sc.setdefault("runtime", dict(DEFAULT_RUNTIME))
    return sc


def published_ms(fig: dict) -> float:
    """The published figure in ms per decode token."""
    if fig["metric"] == "tpot_ms":
        return float(fig["value"])
    if fig["metric"] == "tok_s":
        return 1000.0 / float(fig["value"])
    raise ValueError(f"unknown metric {fig['metric']!r} (tpot_ms or tok_s)")


def _sig(x: float, digits: int = 3) -> float:
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(f"{x:.{digits}g}")


def reference_rows(path: str | Path | None = None) -> list[dict]:
    """Simulate every entry's scenario; one row per entry with the published and predicted figures."""
    from moesim.config.loader import scenario_from_dict
    from moesim.engine.run import simulate

    rows = []
    for e in load_references(path):
        sc = scenario_from_dict(scenario_of(e), source=f"validate/references.yaml: {e['id']}", base_dir=ROOT)
        s = simulate(sc).summary
        pred_ms = float(s["tpot_ms"]["mean"])
        pub_ms = published_ms(e["figure"])
        cp = s["critical_path_ms"]
        total = cp["total"] or 1.0
        split = {k: round(100 * cp[k] / total) for k in ("gpu_compute", "copy_wait", "host", "cpu_expert", "idle")
                 if cp.get(k)}
        rows.append({
            "id": e["id"], "system": e["system"], "hardware": e["hardware"], "model": e["model"],
            "batch": e["batch"], "figure_text": e["figure"]["text"], "metric": e["figure"]["metric"],
            "published": e["figure"]["value"], "bound": e["figure"].get("bound"),
            "published_ms": _sig(pub_ms, 4), "moesim_ms": _sig(pred_ms), "ratio": _sig(pred_ms / pub_ms),
            "moesim_tok_s": _sig(1000.0 / pred_ms),
            "hit_rate": None if s["cache"]["hit_rate"] is None else _sig(s["cache"]["hit_rate"]),
            "time_split_pct": split,
            "source_url": e["source"]["url"], "source_where": " ".join(str(e["source"]["where"]).split()),
            "caveats": list(e.get("caveats", [])),
            "scenario": scenario_of(e),
        })
    return rows


def _verdict(r: float, row: dict | None = None) -> str:
    if row is not None and row.get("bound") == "lower":
        # a published lower bound on tokens/s: moesim is consistent when it predicts at least that
        if r <= 1.0:
            return f"consistent with the bound (moesim {1.0 / r:.1f}x above it)"
        return f"below the bound (moesim {r:.1f}x under it)"
    a = max(r, 1.0 / r)
    if a <= 1.25:
        return "within 25%"
    if a <= 2.0:
        return "within 2x"
    return f"off by {a:.1f}x"


def render_markdown(rows: list[dict]) -> str:
    """The report ``reference-points.md``."""
    n = len(rows)
    within25 = sum(1 for r in rows if max(r["ratio"], 1 / r["ratio"]) <= 1.25)
    within2 = sum(1 for r in rows if max(r["ratio"], 1 / r["ratio"]) <= 2.0)
    faster = sum(1 for r in rows if r["ratio"] < 1.0)
    out = [
        "# Published reference points",
        "",
        "End-to-end decode figures that papers and projects published for systems moesim models, next to "
        "moesim's prediction from the closest scenario it can build (`validate/references.yaml`; regenerate "
        "with `moesim validate references`). Nothing is fitted to these figures, and the scenarios differ "
        "from the published runs in ways listed under each entry (routing traces, unknown settings, hardware "
        "without a preset). Comparison in ms per decode token at batch 1; ratio = moesim / published "
        "(above 1: moesim predicts slower).",
        "",
        f"Of {n} points, {within25} within 25% and {within2} within 2x of the published figure (a lower "
        f"bound counted by its value); moesim predicts faster than published in {faster} of {n}.",
        "",
        "| system | hardware | model | published | moesim | ratio | verdict |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        unit = "ms/token" if r["metric"] == "tpot_ms" else "tok/s"
        pub = f"{'> ' if r['bound'] == 'lower' else ''}{r['published']:g} {unit}"
        mo = f"{r['moesim_ms']:g} ms/token" if r["metric"] == "tpot_ms" else f"{r['moesim_tok_s']:g} tok/s"
        out.append(f"| {r['system']} | {r['hardware']} | {r['model']} | {pub} | {mo} | {r['ratio']:.2f} | "
                   f"{_verdict(r['ratio'], r)} |")
    out += ["", "## Entries", ""]
    for r in rows:
        split = ", ".join(f"{k} {v}%" for k, v in r["time_split_pct"].items())
        hr = "n/a" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%"
        out += [
            f"### {r['system']}: {r['model']} on {r['hardware']} (`{r['id']}`)",
            "",
            f"* Published: {r['figure_text']}; {r['published_ms']:g} ms per token.",
            f"* Source: <{r['source_url']}>, {r['source_where']}.",
            f"* moesim: {r['moesim_ms']:g} ms per token ({r['moesim_tok_s']:g} tok/s), ratio {r['ratio']:.2f} "
            f"({_verdict(r['ratio'], r)}); expert-cache hit rate {hr}; time split {split}.",
            "* Scenario: `" + yaml.safe_dump(r["scenario"]["model"], default_flow_style=True, width=10_000).strip()
            + "` on `" + yaml.safe_dump(r["scenario"]["hardware"], default_flow_style=True, width=10_000).strip()
            + "`, policies `" + yaml.safe_dump(r["scenario"]["policies"], default_flow_style=True,
                                               width=10_000).strip()
            + "`, trace `" + yaml.safe_dump(r["scenario"]["trace"], default_flow_style=True, width=10_000).strip()
            + "`, workload `" + yaml.safe_dump(r["scenario"]["workload"], default_flow_style=True,
                                               width=10_000).strip() + "`.",
            "* Caveats:",
        ]
        out += [f"  * {c}" for c in r["caveats"]]
        out.append("")
    out += [
        "## Not included",
        "",
        "* Mixtral-offloading's own tokens/s table (arXiv:2312.17238, A100 / RTX 3080 Mobile / RTX 3060 / T4): "
        "the table could not be retrieved for this report, so its figures are not quoted; the row above uses "
        "MoE-Infinity's measurement of Mixtral-offloading instead.",
        "* HOBBIT (arXiv:2411.01433) reports speed-ups over baselines rather than absolute figures in its "
        "abstract; not included.",
        "* DeepEP's low-latency all-to-all table is compared in README.md (multi-GPU section), per MoE layer "
        "rather than end to end.",
        "",
    ]
    return "\n".join(out)


def write_report(path: str | Path | None = None, references: str | Path | None = None) -> tuple[Path, list[dict]]:
    """Regenerate the report (atomically) and return its path and rows."""
    rows = reference_rows(references)
    return write_text_atomic(path or REPORT, render_markdown(rows)), rows
