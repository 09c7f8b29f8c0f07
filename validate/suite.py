"""The whole GPU calibration run in one command: component measurements, then end-to-end offloaded
decode experiments, within a time budget, packed into one tarball.

On a GPU machine (torch, transformers, numpy and pyyaml are all it needs; moesim's other
dependencies are not imported)::

    python3 -m validate.suite --out /tmp/moesim-gpu --tar $OUT/moesim-gpu.tgz

writes::

    /tmp/moesim-gpu/measurements/{env,link,expert_gpu,expert_cpu,attention}.json   (validate.measure, all parts)
    /tmp/moesim-gpu/e2e/<experiment>/{e2e.json,trace.npz,scenario.yaml}  (validate.e2e, one per experiment)
    /tmp/moesim-gpu/suite.json                                            (what ran, how long, errors)
    /tmp/moesim-gpu/suite.log

and packs the folder into ``--tar`` after every stage, so a run stopped by a time limit still
leaves the stages it finished. A stage that fails is recorded with its traceback and the suite goes
on. Experiments are skipped (and listed as such) once the budget (``--budget-s``) would be
exceeded. The experiments: Mixtral-8x7B shapes (bf16) with ``--layers`` blocks replaying
``traces/mixtral-8x7b-synth.npz`` under every policy (LRU at three capacities), a batch-4 LRU run,
and Qwen1.5-MoE-A2.7B shapes replaying ``validate/traces/qwen1.5-moe-a2.7b-synth.npz``.

``--quick`` (with ``--device cpu``: the tests) runs the quick measurement and two tiny experiments.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
import traceback
from pathlib import Path

from validate.harness import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
MIXTRAL_TRACE = ROOT / "traces" / "mixtral-8x7b-synth.npz"
QWEN_TRACE = ROOT / "validate" / "traces" / "qwen1.5-moe-a2.7b-synth.npz"


def experiments(layers: int, quick: bool) -> list[dict]:
    """The end-to-end experiments of a suite run, in order (cheapest and most informative first)."""
    if quick:
        base = {"model": "mixtral", "shape": "tiny", "layers": 2, "tokens": 12, "warmup": 2, "prompt_tokens": 8,
                "trace": str(MIXTRAL_TRACE)}
        return [dict(base, name="mixtral-tiny-lru-c6", policy="lru", capacity=6),
                dict(base, name="mixtral-tiny-fiddler-c6", policy="fiddler", capacity=6)]
    E = 8
    total = layers * E
    base = {"model": "mixtral", "shape": "real", "layers": layers, "tokens": 72, "warmup": 8, "prompt_tokens": 64,
            "trace": str(MIXTRAL_TRACE)}
    c = {q: max(2, total * q // 4) for q in (1, 2, 3)}
    out = [
        dict(base, name=f"mixtral-L{layers}-resident", policy="resident", capacity=None),
        dict(base, name=f"mixtral-L{layers}-lru-c{c[2]}", policy="lru", capacity=c[2]),
        dict(base, name=f"mixtral-L{layers}-lru-c{c[1]}", policy="lru", capacity=c[1]),
        dict(base, name=f"mixtral-L{layers}-lru-c{c[3]}", policy="lru", capacity=c[3]),
        dict(base, name=f"mixtral-L{layers}-oracle-c{c[2]}", policy="oracle_prefetch", capacity=c[2]),
        dict(base, name=f"mixtral-L{layers}-streaming", policy="streaming", capacity=None),
        dict(base, name=f"mixtral-L{layers}-fiddler-c{c[2]}", policy="fiddler", capacity=c[2]),
        dict(base, name=f"mixtral-L{layers}-lru-c{c[2]}-b4", policy="lru", capacity=c[2], batch=4, tokens=40,
             warmup=4),
    ]
    qb = {"model": "qwen2_moe", "shape": "real", "layers": layers, "tokens": 72, "warmup": 8, "prompt_tokens": 64,
          "trace": str(QWEN_TRACE)}
    qt = layers * 60
    out += [
        dict(qb, name=f"qwen-L{layers}-lru-c{qt // 4}", policy="lru", capacity=qt // 4),
        dict(qb, name=f"qwen-L{layers}-resident", policy="resident", capacity=None),
    ]
    return out


def _release() -> None:
    """Free the last experiment's model and GPU memory before the next one."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def _pack(out: Path, tar: Path | None) -> None:
    if tar is None:
        return
    tar.parent.mkdir(parents=True, exist_ok=True)
    tmp = tar.with_name("." + tar.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tf:
        tf.add(out, arcname=out.name)
    tmp.replace(tar)


def run_suite(out_dir: str | Path, *, device: str | None = None, quick: bool = False, layers: int = 8,
              budget_s: float = 480.0, tar: str | Path | None = None, parts: str | None = None,
              only: list[str] | None = None) -> dict:
    """Run the measurement and the experiments; returns the ``suite.json`` content."""
    from validate.e2e import run_e2e
    from validate.measure import run_measure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tarp = Path(tar) if tar else None
    logf = open(out / "suite.log", "a", encoding="utf-8")  # noqa: SIM115 - closed below

    def log(msg: str) -> None:
        line = f"[{time.perf_counter() - T0:7.1f} s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    T0 = time.perf_counter()
    summary: dict = {"kind": "moesim validate suite", "device": device, "quick": quick, "layers": layers,
                     "budget_s": budget_s, "stages": []}

    def save():
        summary["seconds"] = time.perf_counter() - T0
        write_json_atomic(out / "suite.json", summary)
        _pack(out, tarp)

    try:
        t0 = time.perf_counter()
        try:
            res = run_measure(out / "measurements", parts, device, quick, log=log)
            summary["stages"].append({"stage": "measure", "ok": True, "seconds": time.perf_counter() - t0,
                                      "skipped": res["skipped"], "format_problems": res["format_problems"]})
        except Exception as exc:  # noqa: BLE001 - recorded, the experiments still run
            log(f"measure FAILED: {type(exc).__name__}: {exc}")
            summary["stages"].append({"stage": "measure", "ok": False, "seconds": time.perf_counter() - t0,
                                      "error": traceback.format_exc()})
        save()
        longest = 0.0
        for ex in experiments(layers, quick):
            name = ex["name"]
            if only and name not in only:
                continue
            elapsed = time.perf_counter() - T0
            if elapsed + max(longest, 20.0) > budget_s:
                log(f"e2e {name}: skipped (budget: {elapsed:.0f} s used of {budget_s:.0f} s)")
                summary["stages"].append({"stage": f"e2e {name}", "ok": None, "skipped": "time budget"})
                continue
            t0 = time.perf_counter()
            kw = {k: v for k, v in ex.items() if k != "name"}
            try:
                r = run_e2e(out=out / "e2e" / name, device=device, log=log, **kw)
                m = r["summary"]
                summary["stages"].append({
                    "stage": f"e2e {name}", "ok": True, "seconds": time.perf_counter() - t0,
                    "token_latency_ms_mean": m["token_latency_ms_mean"], "hits": r["counts"]["measured"]["hits"],
                    "misses": r["counts"]["measured"]["misses"], "reference_check": r["reference_check"]})
            except Exception as exc:  # noqa: BLE001 - recorded, the next experiment still runs
                log(f"e2e {name} FAILED: {type(exc).__name__}: {exc}")
                summary["stages"].append({"stage": f"e2e {name}", "ok": False, "seconds": time.perf_counter() - t0,
                                          "error": traceback.format_exc()})
            longest = max(longest, time.perf_counter() - t0)
            _release()
            save()
    finally:
        save()
        logf.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="moesim GPU calibration suite (measure + e2e) in one command")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--tar", default=None, help="also pack the folder into this .tgz after every stage")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU tests)")
    ap.add_argument("--layers", type=int, default=8, help="MoE blocks of the e2e models (default 8)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip experiments past this many seconds")
    ap.add_argument("--parts", default=None, help="measurement parts (default all)")
    ap.add_argument("--only", default=None, help="comma-separated experiment names")
    a = ap.parse_args(argv)
    s = run_suite(a.out, device=a.device, quick=a.quick, layers=a.layers, budget_s=a.budget_s, tar=a.tar,
                  parts=a.parts, only=a.only.split(",") if a.only else None)
    bad = [st["stage"] for st in s["stages"] if st.get("ok") is False]
    print(json.dumps({"stages": len(s["stages"]), "failed": bad, "seconds": round(s["seconds"], 1)}))
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
