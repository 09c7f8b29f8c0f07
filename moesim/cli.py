"""The ``moesim`` command line (typer): run, presets, trace.

Every user mistake ends with one line on stderr naming the file and field, and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from moesim.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Discrete-event simulator of MoE inference systems.")
trace_app = typer.Typer(no_args_is_help=True, help="Routing traces: statistics, conversion, synthesis, capture.")
app.add_typer(trace_app, name="trace")


def _err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


def _fmt_ms(d) -> str:
    return "n/a" if d is None else f"{d['mean']:.3f} (p50 {d['p50']:.3f}, p99 {d['p99']:.3f})"


def human_summary(s: dict) -> str:
    """A short readable summary of a run."""
    c, t, cp = s["cache"], s["transfers"], s["critical_path_ms"]
    hr = "n/a" if c["hit_rate"] is None else f"{100 * c['hit_rate']:.1f}%"
    total = cp["total"] or 1.0
    parts = ", ".join(
        f"{k} {100 * cp[k] / total:.0f}%"
        for k in ("gpu_compute", "copy_wait", "host", "cpu_expert", "cpu_attention", "comm", "idle") if cp.get(k, 0) > 0
    )
    lines = [
        f"scenario   {s['scenario']}  (hash {s['scenario_hash'][:8]}, seed {s['seed']})",
        (f"decode     {s['tokens']} tokens in {s['decode_steps']} steps x {s['requests']} sequences, "
         if "serving" not in s else
         f"serve      {s['tokens']} output tokens of {s['requests']} requests in {s['decode_steps']} steps, ")
        + f"{s['layer_steps']} layer-steps, simulated {s['measured_time_s']:.4f} s",
        f"TPOT ms    {_fmt_ms(s['tpot_ms'])}",
        f"throughput {s['throughput_tok_s']:.1f} tok/s",
    ]
    if "expert_parallel" not in s and "disaggregated" not in s and "cluster_serving" not in s:
        lines += [
            f"cache      {c['policy']}: {c['hits']} hits / {c['misses']} misses ({hr}), {c['evictions']} evictions",
            f"transfers  {t['bytes_h2d'] / 1e9:.3f} GB host->GPU in {t['copies']} copies",
        ]
    if c.get("prefetch_issued"):
        prec = c.get("prefetch_precision")
        lines.append(
            f"prefetch   {c['prefetch_policy']}: {c['prefetch_issued']} issued, {c['prefetch_used']} used, "
            f"{c['prefetch_wasted']} wasted" + ("" if prec is None else f", precision {100 * prec:.0f}%")
        )
    if c.get("cpu_executed"):
        lines.append(f"cpu        {c['cpu_executed']} expert runs on the CPU, {t['bytes_d2h'] / 1e6:.1f} MB activations down")
    p = s.get("precision", {})
    if p.get("low_precision_loads") or p.get("skipped"):
        lines.append(
            f"precision  {p['low_precision_loads']} low-precision loads, {p['skipped']} skipped; gate mass at low "
            f"precision {100 * (p['gate_mass_low_fraction'] or 0):.1f}%, skipped {100 * (p['gate_mass_skipped_fraction'] or 0):.1f}%"
        )
    ep = s.get("expert_parallel")
    if ep:
        a2a, pl, imb = ep["alltoall"], ep["placement"], ep["imbalance"]
        lines.append(
            f"cluster    {ep['cluster']}: {ep['gpus']} GPUs ({ep['nodes']} nodes), EP {ep['ep']} x "
            f"{ep['ep_groups']} ({ep['ep_layout']}), attention TP {ep['attention_tp']}, "
            f"{ep['tokens_per_step']} tokens/step"
        )
        lines.append(
            f"experts    placement {pl['policy']}: per-GPU expert tokens max/mean "
            f"{imb['expert_tokens_max_over_mean']:.2f}"
            + (f", {pl['rebalances']} rebalances moving {pl['migrated_experts']} experts" if pl.get("rebalances") else "")
        )
        lines.append(
            f"all-to-all {a2a['policy']}: dispatch {a2a['dispatch_ms']:.2f} ms, combine {a2a['combine_ms']:.2f} ms; "
            f"{t['bytes_network'] / 1e9:.3f} GB into the network, {t['bytes_nvlink'] / 1e9:.3f} GB over NVLink"
        )
        lines.append(
            "GPU time   " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in ep["time_split"].items())
        )
    tp = s.get("throughput")  # throughput systems (MoE-Lightning, Klotski, MoE-Gen)
    if tp:
        hrm = tp.get("hrm")
        lines.append(
            f"system     {tp['system']}: {tp['sequences']} sequences per step, "
            f"{tp['bytes_h2d_per_token'] / 1e6:.2f} MB host->GPU per token"
            + (f", HRM estimate {hrm['throughput_tok_s']:.1f} tok/s ({hrm['bound']}-bound)" if hrm else "")
        )
    sv = s.get("serving")
    dg = s.get("disaggregated")
    if dg:
        lines.append(
            f"P/D pools  {dg['prefill_gpus']} prefill + {dg['decode_gpus']} decode GPUs: {sv['finished_requests']} "
            f"requests, TTFT ms {_fmt_ms(s['ttft_ms'])}, KV transfer ms {_fmt_ms(dg['kv_transfer_ms'])}, "
            f"mean decode occupancy {dg['mean_decode_occupancy']:.1f}, goodput {sv['goodput_req_s']:.3f} req/s"
        )
    elif sv and "cluster_serving" in s:
        cs = s["cluster_serving"]
        el = cs.get("elastic")
        lines.append(
            f"EP serve   {sv['mode']}: {cs['gpus']} GPUs, {cs['ranks']} attention ranks; TTFT ms {_fmt_ms(s['ttft_ms'])}; "
            f"goodput {sv['goodput_req_s']:.3f} req/s; {cs['efficiency']['tokens_per_s_per_gpu']:.1f} tok/s per GPU; "
            f"{sv['preemptions']} pre-emptions"
        )
        if el:
            lines.append(
                f"elastic    {el['gpus_before']} -> {el['gpus_after']} GPUs at {el['at_s']:.3f} s: disruption "
                f"{el['disruption_ms']:.1f} ms, {el['kv_moved_requests']} requests moved; tok/s "
                f"{el['tok_s_before'] or 0:.0f} before, {el['tok_s_after'] or 0:.0f} after"
            )
    elif sv:
        lines.append(
            f"serving    {sv['finished_requests']} requests ({sv['batching']}, kv {sv['kv_policy']}): TTFT ms "
            f"{_fmt_ms(s['ttft_ms'])}; e2e ms mean {(s['e2e_ms'] or {}).get('mean', float('nan')):.1f}; "
            f"goodput {sv['goodput_req_s']:.3f} req/s; {sv['preemptions']} pre-emptions; KV peak "
            f"{100 * sv['kv']['peak_fraction']:.1f}% of {sv['kv']['budget_bytes'] / 2**30:.2f} GiB"
        )
    lines += [
        f"time went  {parts}",
        f"wall       {s['wall_time_s']:.2f} s"
        + (f" ({s['layer_steps'] / max(s['wall_time_s'], 1e-9):,.0f} layer-steps/s)" if s["layer_steps"] else ""),
    ]
    return "\n".join(lines)


@app.command()
def run(
    scenarios: List[Path] = typer.Argument(..., help="scenario YAML file(s); several are compared"),
    set_: List[str] = typer.Option([], "--set", help="override a field: key.path=value (repeatable)"),
    out: Optional[Path] = typer.Option(
        None, "--out", help="output directory (default runs/<name>-<hash8>/; several scenarios: DIR/<name>/)"
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="override the scenario seed"),
    timeline: bool = typer.Option(False, "--timeline", help="also write timeline.parquet"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output directory"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the output directory"),
    as_json: bool = typer.Option(False, "--json", help="print summary.json to stdout"),
    rank: str = typer.Option("tpot", help="several scenarios: rank by tpot | throughput | hit_rate | ttft"),
    replicas: int = typer.Option(0, "--replicas", min=0, help="also run N replicas with the measured timing "
                                 "spread and report p10/p50/p90 bands (summary.json 'uncertainty')"),
    spread: Optional[Path] = typer.Option(None, "--spread", help="spread profile JSON for --replicas (default: "
                                          "the bundled one of the hardware, from `moesim validate fit`)"),
    spread_scale: float = typer.Option(1.0, "--spread-scale", min=0.0, help="multiply every measured sigma"),
):
    """Run scenarios; write summary.json and scenario.resolved.yaml (and timeline.parquet) for
    each. Several scenarios are all validated first, then run, then ranked in one table."""
    from moesim.config.loader import load_scenario

    if rank not in RANKS:
        raise InputError(f"unknown rank {rank!r}; valid: {', '.join(RANKS)}", source="--rank")
    loaded = [(str(p), load_scenario(p, set_, seed=seed)) for p in scenarios]  # all input checked first
    names = [sc.name for _, sc in loaded]
    if len(set(names)) != len(names):
        raise InputError("two scenarios share a name; their outputs would collide", source="moesim run")
    results = []
    for src, sc in loaded:
        sub = out if (out is None or len(loaded) == 1) else out / sc.name
        results.append(_run_one(src, sc, sub, timeline=timeline, force=force, quiet=quiet or len(loaded) > 1,
                                replicas=replicas, spread=spread, spread_scale=spread_scale))
    if len(results) == 1:
        result, out_dir = results[0]
        s = result.summary
        if as_json:
            typer.echo(json.dumps(s, indent=2))
        elif quiet:
            typer.echo(str(out_dir))
        else:
            typer.echo(human_summary(s))
            if "uncertainty" in s:
                from moesim.perf.uncertainty import band_line

                typer.echo(band_line(s["uncertainty"]))
            for note in result.prepared.notes:
                typer.echo(f"note       {note}")
            typer.echo(f"output     {out_dir}/")
        return
    summaries = [r.summary for r, _ in results]
    if as_json:
        typer.echo(json.dumps(summaries, indent=2))
        return
    typer.echo(ranked_table(summaries, [d for _, d in results], rank))


RANKS = {
    "tpot": (lambda s: (s["tpot_ms"] or {"mean": float("inf")})["mean"], False),
    "throughput": (lambda s: s["throughput_tok_s"], True),
    "hit_rate": (lambda s: s["cache"]["hit_rate"] or 0.0, True),
    "ttft": (lambda s: (s["ttft_ms"] or {"mean": float("inf")})["mean"], False),  # serving runs
}


def _cell(d, k: str) -> str:
    """A 9-wide table cell of ``d[k]`` (``-`` where the metric is null, e.g. no TPOT)."""
    return f"{d[k]:>9.2f}" if d else f"{'-':>9}"


def ranked_table(summaries: list, dirs: list, rank: str) -> str:
    """Scenarios side by side, best first by ``rank``."""
    key, reverse = RANKS[rank]
    order = sorted(range(len(summaries)), key=lambda i: key(summaries[i]), reverse=reverse)
    serving = any(s.get("serving") for s in summaries)  # serving runs: TTFT too
    ttft_h = f" {'TTFT ms':>9}" if serving else ""
    head = f"{'#':>2}  {'scenario':<44} {'TPOT ms':>9} {'p99 ms':>9}{ttft_h} {'tok/s':>8} {'hit %':>6} {'GB h2d':>8}  output"
    lines = [head, "-" * len(head)]
    for rank_i, i in enumerate(order, 1):
        s = summaries[i]
        hr = s["cache"]["hit_rate"]
        ttft = ""
        if serving:
            ttft = " " + _cell(s.get("ttft_ms"), "mean")
        lines.append(
            f"{rank_i:>2}  {s['scenario'][:44]:<44} {_cell(s['tpot_ms'], 'mean')} {_cell(s['tpot_ms'], 'p99')}{ttft} "
            f"{s['throughput_tok_s']:>8.2f} {('-' if hr is None else f'{100 * hr:.1f}'):>6} "
            f"{s['transfers']['bytes_h2d'] / 1e9:>8.2f}  {dirs[i]}"
        )
    return "\n".join(lines)


@app.command()
def sweep(
    base: Path = typer.Argument(..., help="base scenario YAML"),
    grid: List[str] = typer.Option([], "--grid", help="key.path=v1,v2,...: one axis of the product (repeatable)"),
    zip_: List[str] = typer.Option([], "--zip", help="key.path=v1,v2,...: lists paired element-wise (repeatable)"),
    set_: List[str] = typer.Option([], "--set", help="override a field in every scenario: key.path=value"),
    out: Optional[Path] = typer.Option(None, "--out", help="sweep directory (default runs/sweep-<name>-<hash8>/)"),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="parallel runs (default: all CPU cores)"),
    metric: str = typer.Option("tpot_ms.mean", "--metric", help="metric plotted in sweep.html"),
    seed: Optional[int] = typer.Option(None, "--seed", help="override the scenario seed"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the sweep directory"),
    backend: str = typer.Option("local", "--backend", help="local (joblib on this machine's cores) | ray (moesim[ray])"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local one)"),
):
    """Run a parameter sweep: every scenario is validated first, finished ones are skipped
    (resume), the rest run in parallel (local cores, or a Ray cluster); writes sweep.parquet and
    sweep.html."""
    from moesim.sweep import run_sweep, sweep_table

    res = run_sweep(base, grid, zip_, set_, out=out, jobs=jobs, metric=metric, seed=seed, progress=not quiet,
                    backend=backend, ray_address=ray_address)
    if quiet:
        typer.echo(str(res.out))
        return
    typer.echo(sweep_table(res))
    typer.echo(f"scenarios  {len(res.rows)} ({res.ran} run, {res.skipped} already done)")
    typer.echo(f"table      {res.parquet}")
    typer.echo(f"figure     {res.html}")


@app.command()
def plan(
    base: Path = typer.Argument(..., help="base scenario YAML (model, hardware, trace, workload; its policies are the starting point)"),
    objective: str = typer.Option("tpot", "--objective", help="tpot (mean TPOT, lower is better) | throughput"),
    budget: int = typer.Option(48, "--budget", help="most simulations (trace prefixes included)"),
    top: int = typer.Option(5, "--top", help="rows of the runners-up table"),
    out: Optional[Path] = typer.Option(None, "--out", help="output directory (default runs/plan-<name>-<hash8>/)"),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="parallel simulations (default: all CPU cores)"),
    space: Optional[Path] = typer.Option(None, "--space", help="YAML restricting/extending the search space"),
    set_: List[str] = typer.Option([], "--set", help="override a field of the base: key.path=value (repeatable)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="override the scenario seed"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines on stderr"),
):
    """Plan what to keep on the GPU: search llama.cpp layer splits, expert caches (with GPU or CPU
    execution), kTransformers and streaming under a simulation budget; prints the winner, the
    runners-up, what was pruned and the runtime's equivalent settings; writes plan.json."""
    from moesim.planner import format_plan, run_plan

    say = None if quiet else (lambda msg: typer.echo(msg, err=True))
    res = run_plan(base, sets=set_, objective=objective, budget=budget, top=top, out=out, jobs=jobs,
                   space=space, seed=seed, progress=say)
    typer.echo(format_plan(res, top=top))


@app.command("search-tpot")
def search_tpot_cmd(
    base: Path = typer.Argument(..., help="multi-GPU scenario YAML (cluster:); a serving block is dropped"),
    tpot_ms: float = typer.Option(..., "--tpot-ms", help="TPOT limit (ms)"),
    batches: str = typer.Option("1,2,4,8,16,32,64,128,256", "--batches", help="sequences per attention rank to try"),
    attention_gpus: str = typer.Option("none", "--attention-gpus", help="attention pool sizes: none (co-located) and/or N,..."),
    stat: str = typer.Option("mean", "--stat", help="TPOT statistic held to the limit: mean | p50 | p90 | p99"),
    objective: str = typer.Option("per_gpu", "--objective", help="per_gpu (tokens/s per GPU) | per_dollar"),
    method: str = typer.Option("bisect", "--method", help="bisect (largest feasible batch per split) | exhaustive"),
    steps: int = typer.Option(4, "--steps", help="decode steps simulated per point"),
    set_: List[str] = typer.Option([], "--set", help="override a field of the base: key.path=value (repeatable)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="override the scenario seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the search as JSON to this file"),
    as_json: bool = typer.Option(False, "--json", help="print the search as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines on stderr"),
):
    """Best throughput per GPU (or per dollar) under a TPOT limit: search the batch per attention rank
    and the attention pool size (co-located vs attention-FFN disaggregation); prints the chosen point,
    every point run and the frontier."""
    from moesim.planner.tpot import format_search, search_tpot

    splits = []
    for tok in attention_gpus.split(","):
        tok = tok.strip().lower()
        if tok in ("none", "colocated", "co-located"):
            splits.append(None)
        else:
            try:
                splits.append(int(tok))
            except ValueError:
                raise InputError(f"expected none or a GPU count, got {tok!r}", source="moesim search-tpot",
                                 field="--attention-gpus") from None
    try:
        bs = [int(x) for x in batches.split(",")]
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {batches!r}", source="moesim search-tpot",
                         field="--batches") from None
    say = None if quiet else (lambda msg: typer.echo(msg, err=True))
    res = search_tpot(base, tpot_ms=tpot_ms, batches=bs, attention_gpus=splits, sets=set_, stat=stat,
                      objective=objective, method=method, steps=steps, seed=seed, progress=say)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(res.as_dict(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(out)
    typer.echo(json.dumps(res.as_dict(), indent=2) if as_json else format_search(res))


def _run_one(src: str, sc, out: Optional[Path], *, timeline: bool, force: bool, quiet: bool, replicas: int = 0,
             spread: Optional[Path] = None, spread_scale: float = 1.0):
    """Simulate one validated scenario and write its outputs; returns (result, output dir). With
    ``replicas``, the summary gains the ``uncertainty`` block (moesim.perf.uncertainty)."""
    from moesim.config.loader import resolved_dict
    from moesim.engine.run import simulate
    from moesim.metrics.output import write_outputs

    if replicas:
        from moesim.perf import uncertainty as unc

        if getattr(sc, "cluster", None) is not None:
            raise InputError("replicas are modelled for single-GPU scenarios (no cluster block)", source=src,
                             field="--replicas")
        spread_d, spread_src = unc.load_spread(spread, sc.hardware.name)
    with _progress(quiet) as prog:
        result = simulate(sc, source=src, record_timeline=timeline, progress=prog)
    if replicas:
        reps = unc.run_replicas(sc, replicas, spread_d, scale=spread_scale, source=src)
        result.summary["uncertainty"] = unc.uncertainty_block(reps, seed=sc.seed, spread_source=spread_src,
                                                              spread=spread_d, scale=spread_scale)
    out_dir = out if out is not None else Path("runs") / f"{sc.name}-{result.scenario_hash[:8]}"
    try:
        write_outputs(
            out_dir,
            summary=result.summary,
            resolved=resolved_dict(sc),
            timeline_rows=result.result.timeline if timeline else None,
            requests=result.requests,
            force=force,
        )
    except FileExistsError:
        raise InputError(f"output directory {out_dir} exists; pass --force to overwrite", source="--out") from None
    return result, out_dir


class _progress:
    """A rich progress bar on stderr for long runs (silent when quiet or not a terminal)."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet and sys.stderr.isatty()
        self._bar = None
        self._task = None

    def __enter__(self):
        return self if self.enabled else None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            if total < 2048:
                return
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("decode steps"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("run", total=total)
        self._bar.update(self._task, completed=done)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()
        return False


@app.command()
def presets(kind: str = typer.Argument("all", help="hardware | models | clusters | policies | all")):
    """List the hardware, model, cluster and policy presets."""
    from moesim.hardware.presets import list_hardware_presets
    from moesim.models.presets import list_model_presets
    from moesim.network.cluster import cluster_presets
    from moesim.policies.base import FAMILIES, registry

    if kind not in ("all", "hardware", "models", "clusters", "policies"):
        raise InputError(
            f"unknown kind {kind!r}; valid: hardware, models, clusters, policies, all", source="moesim presets"
        )
    if kind in ("all", "hardware"):
        typer.echo("hardware: " + ", ".join(list_hardware_presets()))
    if kind in ("all", "clusters"):
        typer.echo("clusters: " + ", ".join(cluster_presets()))
    if kind in ("all", "models"):
        typer.echo("models:   " + ", ".join(list_model_presets()))
    if kind in ("all", "policies"):
        for fam in FAMILIES:
            typer.echo(f"{fam + ':':<10}" + ", ".join(sorted(registry(fam))))


@trace_app.command("stats")
def trace_stats(
    path: Path = typer.Argument(..., help="trace .npz or directory"),
    as_json: bool = typer.Option(False, "--json"),
    html: Path | None = typer.Option(None, "--html", help="write each figure as DIR/<name>.html"),
):
    """Print trace statistics: popularity (Gini, entropy), temporal reuse, cross-layer transitions,
    SRP/SCH segment metrics, working sets and an LRU/LFU/Belady hit-rate table."""
    from moesim.traces import load_trace
    from moesim.traces.stats import format_statistics, statistics_figures, trace_statistics

    st = trace_statistics(load_trace(path))
    if html is not None:
        try:
            html.mkdir(parents=True, exist_ok=True)
            for name, fig in statistics_figures(st).items():
                fig.write_html(html / f"{name}.html", include_plotlyjs="cdn")
        except OSError as exc:
            raise InputError(f"cannot write figures ({exc})", source=str(html), field="--html") from None
    if as_json:
        typer.echo(json.dumps(st, indent=2, default=_jsonable))
        return
    typer.echo(format_statistics(st))
    if html is not None:
        typer.echo(f"\nfigures written to {html}")


@trace_app.command("convert")
def trace_convert(
    src: Path = typer.Argument(..., help="input routing log or trace"),
    dst: Path = typer.Argument(..., help="output: .npz, .jsonl, .parquet, or a directory of .npy"),
    from_: Optional[str] = typer.Option(
        None, "--from", help="input format: router-json|jsonl|layer-lists|parquet|npz (default: from the name)"
    ),
    to: Optional[str] = typer.Option(None, "--to", help="output format: npz|jsonl|parquet|dir (default: from the name)"),
    keep_padding: bool = typer.Option(
        False, "--keep-padding", help="keep rows that look like padding (64+ identical consecutive rows)"
    ),
    model: Optional[str] = typer.Option(
        None, help="model the trace was captured from (sets meta.model; RouterTrace JSON: must match the file)"
    ),
):
    """Convert between routing-log formats: RouterTrace JSON, JSONL rows, per-layer expert lists,
    Parquet long form, .npz and .npy directories. Padding / warm-up rows of serving-engine logs
    (runs of 64+ identical consecutive rows) are dropped and counted unless --keep-padding."""
    from moesim.traces import load_trace, save_trace
    from moesim.traces import convert as cv

    where = "moesim trace convert"
    fmt_in = from_ or cv.guess_input_format(src)
    if fmt_in not in cv.INPUT_FORMATS:
        raise InputError(f"unknown input format {fmt_in!r}; expected one of {', '.join(cv.INPUT_FORMATS)}", source=where, field="--from")
    fmt_out = to or cv.guess_output_format(dst)
    if fmt_out not in cv.OUTPUT_FORMATS:
        raise InputError(f"unknown output format {fmt_out!r}; expected one of {', '.join(cv.OUTPUT_FORMATS)}", source=where, field="--to")
    is_npz_name = dst.suffix.lower() == ".npz"
    if (fmt_out == "npz") != is_npz_name:
        want = "a name ending in .npz" if fmt_out == "npz" else "a name not ending in .npz"
        raise InputError(f"--to {fmt_out} needs {want}", source=str(dst), field="DST")

    if fmt_in == "jsonl":
        tr = cv.from_jsonl(src, model=model, keep_padding=keep_padding)
    elif fmt_in == "layer-lists":
        tr = cv.from_layer_lists(src, model=model, keep_padding=keep_padding)
    else:
        if fmt_in == "router-json":
            try:
                tr = cv.from_router_trace_json(src, model=model)
            except InputError as exc:
                if model is not None or exc.field != "source.model.id":
                    raise
                tr = cv.from_router_trace_json(src, model="google/switch-base-8")  # the historical default
        elif fmt_in == "parquet":
            tr = cv.from_parquet_long(src)
        else:
            tr = load_trace(src)
        if model is not None:
            tr.meta = {**(tr.meta or {}), "model": model}
        tr = cv.drop_padding(tr, keep_padding=keep_padding, source=str(src))

    if fmt_out == "jsonl":
        cv.to_jsonl(tr, dst)
    elif fmt_out == "parquet":
        cv.to_parquet_long(tr, dst)
    else:
        save_trace(tr, dst)
    T, L, K = tr.experts.shape
    dropped = (tr.meta or {}).get("dropped_rows", 0)
    typer.echo(f"wrote {dst} ({fmt_out}): {T} rows x {L} layers x top-{K}; dropped {dropped} padding rows")
    if dropped or "kept" in str((tr.meta or {}).get("dropped_reason", "")):
        typer.echo(f"  {tr.meta['dropped_reason']}")


@trace_app.command("synth")
def trace_synth(
    dst: Path = typer.Argument(..., help="output .npz file or directory"),
    model: Optional[str] = typer.Option(None, help="model preset (gives layers, experts, top-k); with --fit, only names the output"),
    tokens: int = typer.Option(4096, min=1),
    zipf_s: float = typer.Option(1.0, min=0.0),
    reuse_prob: float = typer.Option(0.3, min=0.0, max=1.0),
    seed: int = typer.Option(0),
    fit: Optional[Path] = typer.Option(None, "--fit", help="fit a profile to this trace (popularity, reuse, cross-layer transitions) and generate from it; the shape comes from the trace"),
    profile_out: Optional[Path] = typer.Option(None, "--profile-out", help="with --fit or --published: also write the fitted profile as JSON"),
    published: Optional[str] = typer.Option(None, "--published", help="NAME[:SUBSET]: fit to routing statistics a paper published (mixtral-8x7b: Mixtral paper's Table 5; subset e.g. github, default the mean); --model (default the paper's model) gives the shape"),
):
    """Write a synthetic trace: per-layer Zipf popularity and temporal reuse for a model preset,
    (--fit) one fitted to a real trace's statistics, or (--published) one fitted to published ones."""
    from moesim.traces import save_trace, synthesize

    if published is not None:
        if fit is not None:
            raise InputError("give --fit or --published, not both", source="moesim trace synth", field="--published")
        from moesim.models.presets import load_model_preset
        from moesim.models.spec import ModelSpec
        from moesim.traces.synthetic import PUBLISHED_STATS, fit_published, parse_published, synthesize_published

        name, _subset = parse_published(published)
        m = ModelSpec.model_validate(load_model_preset(model or PUBLISHED_STATS[name]["model"]))
        shape = dict(layers=list(m.moe_layers), num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k)
        if profile_out is not None:
            Path(profile_out).write_text(json.dumps(fit_published(published, **shape), indent=1) + "\n", encoding="utf-8")
        tr = synthesize_published(published, num_tokens=tokens, seed=seed, model_name=m.name, **shape)
        save_trace(tr, dst)
        typer.echo(f"wrote {dst}: {tokens} rows x {len(m.moe_layers)} layers x top-{m.top_k}, fitted to published "
                   f"statistics {published}" + (f"; profile {profile_out}" if profile_out is not None else ""))
        return
    if fit is not None:
        from moesim.traces import fit_profile, load_trace, synthesize_from_profile

        profile = fit_profile(load_trace(fit))
        if profile_out is not None:
            Path(profile_out).write_text(json.dumps(profile, indent=1) + "\n", encoding="utf-8")
        tr = synthesize_from_profile(profile, num_tokens=tokens, seed=seed, model_name=model)
        save_trace(tr, dst)
        typer.echo(f"wrote {dst}: {tokens} rows x {len(profile['layers'])} layers x top-{profile['top_k']}, "
                   f"fitted to {fit}" + (f"; profile {profile_out}" if profile_out is not None else ""))
        return
    if profile_out is not None:
        raise InputError("--profile-out needs --fit or --published", source="moesim trace synth", field="--profile-out")
    if model is None:
        raise InputError("give --model PRESET or --fit TRACE", source="moesim trace synth", field="--model")
    from moesim.models.presets import load_model_preset
    from moesim.models.spec import ModelSpec

    m = ModelSpec.model_validate(load_model_preset(model))
    tr = synthesize(
        num_tokens=tokens, layers=list(m.moe_layers), num_experts=m.num_experts, top_k=m.top_k,
        zipf_s=zipf_s, reuse_prob=reuse_prob, seed=seed, model_name=m.name,
    )
    save_trace(tr, dst)
    typer.echo(f"wrote {dst}: {tokens} rows x {len(m.moe_layers)} layers x top-{m.top_k}")


@trace_app.command("capture")
def trace_capture(
    out: Path = typer.Option(..., "--out", help="output trace: .npz, or a directory of .npy files"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help='prompt file: one prompt per line, or .jsonl with {"prompt": ...} per line'),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="a prompt (repeatable; after those of --prompts)"),
    model: Optional[str] = typer.Option(None, "--model", help="Hugging Face model id or local directory (weights, config, tokenizer)"),
    config: Optional[str] = typer.Option(None, "--config", help="config.json (or a directory holding one) or an architecture: mixtral, qwen2-moe, qwen3-moe, olmoe, deepseek-v3, gpt-oss, phimoe, switch; needs --random-weights"),
    random_weights: bool = typer.Option(False, "--random-weights", help="random initialisation (seeded) instead of loading weights: tests the pipeline, routing of an untrained model"),
    tiny: bool = typer.Option(False, "--tiny", help="with --random-weights: shrink to 4 small layers, keeping experts, top-k and the routing rule"),
    seed: int = typer.Option(0, "--seed", help="seed of the random weights"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, or auto (device_map=auto)"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the checkpoint's; float32 for random weights), float32, bfloat16, float16"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="tokens generated greedily per prompt (N new tokens give N-1 decode rows)"),
    max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens", min=1, help="cut longer prompts to this many tokens"),
    probs: bool = typer.Option(False, "--probs", help="also record the full router distribution probs [T, L, E] (float16)"),
    spec_next: Optional[str] = typer.Option(None, "--spec-next", help="also record spec_next [T, L, K]: the next MoE layer's router applied to this layer's hidden state (Mixtral-offloading's guess): gate_input (what this layer's router saw) or residual (the stream after this layer's experts, through the next layer's norm)"),
    stack: str = typer.Option("decoder", "--stack", help="Switch Transformers: decoder (generation steps) or encoder (the prompt pass)"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="always generate --max-new-tokens tokens"),
    name: Optional[str] = typer.Option(None, "--name", help="meta.model (default: the model id, or the architecture for random weights)"),
    licence: Optional[str] = typer.Option(None, "--licence", help="meta.licence (the model's and prompts' terms)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no per-prompt progress lines on stderr"),
):
    """Capture a routing trace from a Hugging Face transformers MoE model (Mixtral, Qwen2-MoE,
    Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, Phi-MoE, Switch Transformers) with forward hooks on
    its router modules: prefill and greedy decode rows per prompt, with request, token, step and
    phase. Needs torch and transformers: the calibrate extra of moesim."""
    from moesim.traces.capture import capture

    def show(p: dict) -> None:
        typer.echo(f"capture: prompt {p['i']}/{p['n']}: {p['prompt_tokens']} prompt + {p['new_tokens']} "
                   f"new tokens, {p['rows']} rows so far ({p['seconds']:.1f} s)", err=True)

    tr = capture(
        out=out, prompts=prompt, prompts_file=prompts, model=model, config=config,
        random_weights=random_weights, tiny=tiny, seed=seed, device=device, dtype=dtype,
        max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, probs=probs, stack=stack,
        ignore_eos=ignore_eos, name=name, licence=licence, progress=None if quiet else show,
        spec_next=spec_next,
    )
    T, L, K = tr.experts.shape
    n_dec = int((tr.phase == 1).sum())
    typer.echo(f"wrote {out}: {T} rows ({T - n_dec} prefill, {n_dec} decode) x {L} MoE layers x top-{K} "
               f"of {tr.meta['num_experts']} experts; {tr.meta['model']}")


def _int_list(text: str, field: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            raise InputError(f"expected comma-separated positive integers, got {part!r}",
                             source="moesim trace cache-curve", field=field) from None
        out.append(v)
    return out


@trace_app.command("cache-curve")
def trace_cache_curve(
    path: Path = typer.Argument(..., help="trace .npz or directory"),
    policies: str = typer.Option("lru,lfu,belady", "--policies", help="comma-separated cache policy kinds"),
    capacities: str = typer.Option("16,32,64", "--capacities", help="comma-separated capacities (expert slots)"),
    scope: str = typer.Option("global", "--scope", help="global | per_layer"),
    batch_size: int = typer.Option(1, "--batch-size", help="trace rows per decode step"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="trace rows replayed (default all)"),
    html: Optional[Path] = typer.Option(None, "--html", help="write a plotly figure (hit rate vs capacity)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
):
    """Hit rate versus cache capacity per policy, replayed without the timing engine."""
    from moesim.policies.cache.curve import curve_figure, hit_curve

    kinds = [k.strip() for k in policies.split(",")]
    caps = _int_list(capacities, "--capacities")
    curve = hit_curve(path, kinds, caps, scope=scope, batch_size=batch_size, max_tokens=max_tokens)
    if html is not None:
        curve_figure(curve).write_html(str(html), include_plotlyjs="cdn")
    if as_json:
        typer.echo(json.dumps(curve, indent=2, default=_jsonable))
        return
    typer.echo(f"{curve['steps']} steps x {curve['layers']} layers, scope {curve['scope']}, batch {curve['batch_size']}")
    typer.echo(f"{'policy':<16}{'capacity':>10}{'hits':>10}{'misses':>10}{'hit rate':>10}")
    for r in curve["results"]:
        hr = "n/a" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.2f}%"
        typer.echo(f"{r['policy']:<16}{r['capacity']:>10}{r['hits']:>10}{r['misses']:>10}{hr:>10}")
    if html is not None:
        typer.echo(f"wrote {html}")


@app.command()
def dashboard(
    port: int = typer.Option(8501, "--port", help="port to listen on"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (default: localhost only)"),
):
    """Start the Streamlit dashboard (what-if, timeline, curves, compare, traces, calibration)."""
    import subprocess
    from importlib.util import find_spec

    spec = find_spec("dashboard.app")
    if spec is None or spec.origin is None:
        raise InputError("the dashboard package is not installed", source="moesim dashboard")
    cmd = [sys.executable, "-m", "streamlit", "run", spec.origin, "--server.address", host,
           "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    typer.echo(f"moesim dashboard on http://{host}:{port}/ (Ctrl-C to stop)")
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


validate_app = typer.Typer(no_args_is_help=True, help="Calibration: compare moesim's models with measurements.")
app.add_typer(validate_app, name="validate")


@validate_app.command("compare")
def validate_compare(
    out: Path = typer.Option(Path("validate/reports"), "--out", help="report folder (component-report.{json,md,html})"),
    fail_above: Optional[float] = typer.Option(
        None, "--fail-above", help="exit 1 when any component's MAPE exceeds this many percent"
    ),
    measurements: Optional[Path] = typer.Option(
        None, "--measurements", help="measurement folder (default: the committed H100 data)"
    ),
    preset: str = typer.Option("h100-sxm-pcie5", "--preset", help="hardware preset whose models are compared"),
    e2e: Optional[Path] = typer.Option(
        None, "--e2e", help="also the end-to-end report of every e2e.json under this folder (e2e-report.*)"
    ),
    replicas: int = typer.Option(0, "--replicas", min=0, help="with --e2e: simulated bands from N replicas"),
    spread: Optional[Path] = typer.Option(None, "--spread", help="with --replicas: spread profile JSON"),
):
    """Component report: the simulator's GPU-expert, eager-launch, copy and CPU-expert models against
    the measured medians, with the error per row and the MAPE per component; with --e2e, the
    end-to-end report (measured vs simulated token latency, hits, bytes; MAPE)."""
    from validate.compare import component_report, exceeding, summary_table, write_report

    report = component_report(measurements, preset)
    e2e_rep = None
    if e2e is not None:
        from validate import compare_e2e

        e2e_rep = compare_e2e.e2e_report(e2e, replicas=replicas, spread=spread)
    paths = write_report(report, out)
    typer.echo(summary_table(report))
    if e2e_rep is not None:
        paths += compare_e2e.write_report(e2e_rep, out)
        typer.echo(compare_e2e.summary_table(e2e_rep))
        for c in e2e_rep["caveats"][:1]:
            typer.echo(f"note       {c}")
    typer.echo("report     " + ", ".join(str(p) for p in paths))
    if fail_above is not None:
        bad = exceeding(report, fail_above)
        for s in bad:
            _err(f"{s['component']}: MAPE {s['mape_pct']:.2f}% exceeds {fail_above:g}%")
        bad_e2e = compare_e2e.exceeding(e2e_rep, fail_above) if e2e_rep is not None else []
        for s in bad_e2e:
            _err(f"end-to-end ({s['device']}): mean token latency MAPE {s['mape_mean_pct']:.2f}% exceeds {fail_above:g}%")
        if bad or bad_e2e:
            return 1
    return 0


def _register_validate_commands() -> None:
    """``validate measure | e2e | references | suite`` live in ``validate/commands.py``."""
    from validate.commands import register

    register(validate_app)


_register_validate_commands()


def _jsonable(o):
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the typer app; input errors become one line on stderr and exit code 2."""
    import click

    try:
        rv = app(args=argv, standalone_mode=False, prog_name="moesim")
    except InputError as exc:
        _err(exc.line())
        return 2
    except click.exceptions.ClickException as exc:  # usage errors: click's message, its code (2)
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        _err("aborted")
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
