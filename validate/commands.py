"""The ``moesim validate measure | e2e | fit | references | suite`` commands, registered on the CLI's
``validate`` sub-app by :func:`register` (``moesim/cli.py`` calls it). Heavy imports (torch,
transformers, the simulator) happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moesim.errors import InputError


def register(app: typer.Typer) -> None:
    """Add the commands to ``app`` (the ``validate`` typer)."""

    @app.command("measure")
    def validate_measure(
        out: Path = typer.Option(..., "--out", help="measurement folder (env, link, expert_gpu, expert_cpu .json)"),
        parts: str = typer.Option("expert,copies,launch,cpu,interference,attention", "--parts",
                                  help="comma-separated: expert, copies, launch, cpu, interference, attention (or all)"),
        device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)"),
        quick: bool = typer.Option(False, "--quick", help="tiny sizes and few repetitions (tests the harness)"),
    ):
        """Component measurements in the layout of validate/measurements/external/h100-sxm (fit.py and
        `validate compare --measurements DIR` read them); CUDA-only parts are skipped, with a note, on
        the CPU."""
        from validate.measure import PARTS, run_measure

        if device not in (None, "cuda", "cpu"):
            raise InputError(f"expected cuda or cpu, got {device!r}", source="moesim validate measure",
                             field="--device")
        try:
            names = [p.strip() for p in parts.split(",") if p.strip()]
            if names == ["all"]:
                names = list(PARTS)
            bad = [p for p in names if p not in PARTS]
            if bad:
                raise ValueError(f"unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
            res = run_measure(out, names, device, quick, log=typer.echo)
        except ValueError as exc:
            raise InputError(str(exc), source="moesim validate measure", field="--parts") from None
        except RuntimeError as exc:
            raise InputError(str(exc), source="moesim validate measure", field="--device") from None
        for p in res["written"]:
            typer.echo(f"wrote      {p}")
        if res["format_problems"]:
            typer.echo(f"format     {len(res['format_problems'])} difference(s) from the reference layout")
        typer.echo(f"done       {res['seconds']:.1f} s, {len(res['skipped'])} part(s) skipped")

    @app.command("e2e")
    def validate_e2e(
        model: str = typer.Option("mixtral", "--model", help="mixtral or qwen2_moe (transformers classes)"),
        layers: int = typer.Option(2, "--layers", min=1, help="MoE blocks (the trace's first N columns)"),
        policy: str = typer.Option("lru", "--policy", help="resident, lru, oracle_prefetch, streaming, fiddler"),
        capacity: Optional[int] = typer.Option(None, "--capacity", min=0, help="GPU expert slots (lru, oracle_prefetch, fiddler)"),
        trace: Path = typer.Option(..., "--trace", help="routing trace to replay (.npz or trace directory)"),
        tokens: int = typer.Option(32, "--tokens", min=2, help="decode steps"),
        out: Path = typer.Option(..., "--out", help="output folder (e2e.json, trace.npz, scenario.yaml)"),
        device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)"),
        shape: str = typer.Option("tiny", "--shape", help="tiny or real (Mixtral-8x7B / Qwen1.5-MoE dimensions)"),
        batch: int = typer.Option(1, "--batch", min=1, help="sequences decoded together (trace rows per step)"),
        warmup: int = typer.Option(4, "--warmup", min=0, help="steps left out of counts and latency statistics"),
        prompt_tokens: int = typer.Option(16, "--prompt-tokens", min=1, help="prefilled context per sequence"),
        simulate: bool = typer.Option(True, "--simulate/--no-simulate", help="also print moesim's prediction"),
    ):
        """Offloaded decode of a real MoE architecture replaying a trace under one policy; records
        per-token latency, a per-layer timeline and hit/miss counts, and writes the equivalent moesim
        scenario."""
        from validate.e2e import run_e2e, simulate_result

        if device not in (None, "cuda", "cpu"):
            raise InputError(f"expected cuda or cpu, got {device!r}", source="moesim validate e2e", field="--device")
        if not Path(trace).exists():
            raise InputError("no such trace", source=str(trace), field="--trace")
        try:
            r = run_e2e(model=model, layers=layers, policy=policy, capacity=capacity, trace=trace, tokens=tokens,
                        out=out, device=device, shape=shape, batch=batch, warmup=warmup,
                        prompt_tokens=prompt_tokens, log=typer.echo)
        except ValueError as exc:
            raise InputError(str(exc), source="moesim validate e2e") from None
        c = r["counts"]["measured"]
        typer.echo(f"measured   {c['hits']} hits / {c['misses']} misses ({c['loads']} loads, {c['streamed']} streamed, "
                   f"{c['cpu_experts']} on the CPU), {c['copies']} copies")
        if r["reference_check"] is not None:
            rc = r["reference_check"]
            typer.echo(f"check      layer 0 vs {rc['module'].rsplit('.', 1)[-1]}: rel err {rc['rel_err']:.2e} "
                       f"({'ok' if rc['ok'] else 'MISMATCH'})")
        if simulate:
            s = simulate_result(out)
            typer.echo(f"moesim     {s['cache']['hits']} hits / {s['cache']['misses']} misses, TPOT mean "
                       f"{s['tpot_ms']['mean']:.3f} ms (measured {r['summary']['token_latency_ms_mean']:.3f} ms; "
                       f"hardware preset {r['scenario']['hardware']['preset']})")
        typer.echo(f"wrote      {Path(out) / 'e2e.json'}, trace.npz, scenario.yaml")

    @app.command("fit")
    def validate_fit(
        measurements: Optional[Path] = typer.Option(None, "--measurements",
                                                    help="measurement folder (default: the committed H100 data)"),
        name: Optional[str] = typer.Option(None, "--name", help="profile name (default: the folder's name)"),
        base: Optional[str] = typer.Option(None, "--base", help="hardware preset for spec-sheet numbers (default: "
                                           "by the measured GPU's name)"),
        out: Optional[Path] = typer.Option(None, "--out", help="output folder (default validate/profiles/NAME)"),
        install: bool = typer.Option(False, "--install", help="also install as preset NAME (moesim/hardware/"
                                     "presets, moesim/perf/tables)"),
        force: bool = typer.Option(False, "--force", help="with --install: replace existing files"),
    ):
        """Fit a hardware profile (preset YAML, expert tables by tokens, timing spread) to a measurement
        folder; scenarios name an installed profile with hardware: {preset: NAME}."""
        import re

        from moesim.hardware.fit import default_measurement_dir
        from validate.profile import ROOT, fit_profile, write_profile

        folder = Path(measurements) if measurements is not None else default_measurement_dir()
        nm = name or folder.resolve().name
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", nm):
            raise InputError(f"expected lower-case letters, digits, '.', '_' or '-', got {nm!r}", source="--name")
        res = fit_profile(folder, name=nm, base=base)
        dest = out if out is not None else ROOT / "validate" / "profiles" / nm
        paths = write_profile(res, dest, install=install, force=force)
        f = res["fitted"]
        typer.echo(f"link       H2D {f['link.h2d_bandwidth_gb_s']} GB/s, D2H {f['link.d2h_bandwidth_gb_s']} GB/s, "
                   f"setup {f['link.setup_us']} us, both ways x{f['link.bidirectional_derate']}")
        typer.echo(f"host       launch {f['host.launch_us']} us, eager op {f['host.eager_op_us']} us, graph "
                   f"{f['host.graph_launch_us']} us, copy issue {f['host.copy_issue_us']} us, router read-back "
                   f"{f['host.router_readback_us']} us")
        typer.echo(f"cpu        call {f['cpu.call_overhead_us']} us, DRAM {f['cpu.dram_bandwidth_gb_s']} GB/s per weight "
                   f"pass, bf16 passes {f['cpu.weight_passes.bf16']}, compute eff {f['cpu.compute_efficiency']} "
                   "(added to streaming)")
        typer.echo(f"gpu        memory eff {f['gpu.memory_efficiency']}, compute eff {f['gpu.compute_efficiency']}, "
                   f"kernel fixed {f['gpu.kernel_fixed_us']} us, copy interference x"
                   f"{f['gpu.copy_interference.memory_bound_slowdown']} (memory-bound)")
        sp = res["spread"]
        typer.echo(f"spread     GPU op sigma {sp['gpu_kernel']['sigma']}, CPU expert sigma {sp['cpu_expert']['sigma']}, "
                   f"copy tables {', '.join(sp['copy'])}")
        if res["kept_from_base"]:
            typer.echo(f"base       {res['base']} kept for: {', '.join(res['kept_from_base'])}")
        for p in paths:
            typer.echo(f"wrote      {p}")
        if not install:
            typer.echo(f"use        --install to name it in scenarios as hardware: {{preset: {nm}}}")

    @app.command("references")
    def validate_references(
        out: Path = typer.Option(Path("validate/reports/reference-points.md"), "--out",
                                 help="report file (Markdown)"),
        references: Optional[Path] = typer.Option(None, "--references",
                                                  help="reference list (default validate/references.yaml)"),
    ):
        """Published end-to-end figures of modelled systems next to moesim's predictions."""
        from validate.references import write_report

        path, rows = write_report(out, references)
        typer.echo("| id | published ms/token | moesim ms/token | ratio |")
        typer.echo("|---|---:|---:|---:|")
        for r in rows:
            typer.echo(f"| {r['id']} | {r['published_ms']:g} | {r['moesim_ms']:g} | {r['ratio']:.2f} |")
        typer.echo(f"report     {path}")

    @app.command("suite")
    def validate_suite(
        out: Path = typer.Option(..., "--out", help="output folder"),
        tar: Optional[Path] = typer.Option(None, "--tar", help="also pack the folder into this .tgz"),
        device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu"),
        quick: bool = typer.Option(False, "--quick", help="tiny sizes (tests)"),
        layers: int = typer.Option(8, "--layers", min=1, help="MoE blocks of the e2e models"),
        budget_s: float = typer.Option(480.0, "--budget-s", help="skip experiments past this many seconds"),
    ):
        """measure (all parts) + the end-to-end experiments, in one command (see validate/suite.py)."""
        from validate.suite import run_suite

        s = run_suite(out, device=device, quick=quick, layers=layers, budget_s=budget_s, tar=tar)
        bad = [st["stage"] for st in s["stages"] if st.get("ok") is False]
        typer.echo(f"suite      {len(s['stages'])} stages, {len(bad)} failed, {s['seconds']:.1f} s")
        return 1 if bad else 0
