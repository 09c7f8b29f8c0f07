"""Measured timing spread and replicated runs: how sure a prediction is.

The hardware model is fitted to *medians* (:mod:`moesim.hardware.fit`). The repetitions behind each
median also have a spread (every timing row of the calibration data keeps p10 and p90). A *spread
profile* keeps that spread per component, as the ``sigma`` of a lognormal multiplier with median 1:

    time = model_time * exp(sigma * z),  z ~ N(0, 1),  sigma = ln(p90 / p10) / (2 * 1.2816)

(1.2816 is the standard normal 90th percentile, so a lognormal with that sigma has the measured
p90/p10 ratio). The median of each sampled time stays the model's median-fitted time; the mean is
``exp(sigma**2 / 2)`` times larger. Components:

* ``copy``: per direction (``h2d``/``d2h``) and host-memory kind (``pinned``/``pageable``), a table
  ``[[bytes, sigma], ...]`` from the copy-by-size rows (event time), interpolated in log(bytes) and
  clamped at the ends. The back-to-back expert-sized H2D series (100 repetitions) adds a pinned H2D
  point at its size.
* ``gpu_kernel``: one sigma for every GPU op (expert FFN, dense stage, LM head), the median over the
  expert rows of the spread of CUDA-graph time. A graph replay holds ``G`` calls, so its spread is
  that of a mean of ``G`` calls: it is scaled by ``sqrt(G)``, which assumes the calls vary
  independently (an assumption: variation shared by consecutive calls, e.g. clock state, is
  overstated by it). Dense/attention spread is not measured separately (the ``attention`` measure
  part records it; the fit does not use it yet).
* ``cpu_expert``: one sigma, the median over the CPU expert rows (host wall time per call).

Host costs (launch, read-back) are not varied: their measured spread is below 2%.

:func:`run_replicas` runs a single-GPU scenario ``n`` times, replica ``i`` drawing its multipliers
from ``numpy.random.SeedSequence([seed + i, tag])`` (three independent streams: copies, GPU ops,
CPU experts), so the same scenario, seed and spread give the same replicas. :func:`uncertainty_block`
turns them into p10/p50/p90 bands over replicas (``summary.json``'s ``uncertainty`` block). With
every sigma 0, a replica is exactly the plain run. The engine takes the multipliers through
``SingleGpuEngine.noise``; when it is ``None`` (every ordinary run) each copy and op pays one
``is None`` test.
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_left
from importlib import resources
from pathlib import Path

import numpy as np

from moesim.errors import InputError

#: standard normal 90th percentile
Z90 = 1.2815515655446004
FORMAT_VERSION = 1
SPREAD_KIND = "moesim timing spread"
#: multipliers drawn per block from numpy
BLOCK = 4096
#: a tag mixed into every replica's seed so the multiplier streams differ from other consumers of
#: the scenario seed (synthetic traces, policies)
NOISE_TAG = 0x6E6F6973
COPY_KEYS = ("h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable")
#: what the bands are taken over: summary key -> getter
BAND_METRICS = {
    "tpot_mean_ms": lambda s: s["tpot_ms"]["mean"],
    "tpot_p50_ms": lambda s: s["tpot_ms"]["p50"],
    "tpot_p90_ms": lambda s: s["tpot_ms"]["p90"],
    "tpot_p99_ms": lambda s: s["tpot_ms"]["p99"],
    "throughput_tok_s": lambda s: s["throughput_tok_s"],
}


# ----- fitting a spread profile from measurements ------------------------------------------------
def sigma_of(stats: dict) -> float | None:
    """Lognormal sigma of a timing row from its p10 and p90 (None when they are not positive)."""
    p10, p90 = float(stats["p10"]), float(stats["p90"])
    if p10 <= 0 or p90 <= 0:
        return None
    return max(0.0, math.log(p90 / p10) / (2.0 * Z90))


def _r(x: float) -> float:
    return float(f"{x:.4g}")


def fit_spread(m: dict, *, hardware: str, source: str) -> dict:
    """The spread profile of a measurement set ``m`` (:func:`moesim.hardware.fit.load_measurements`'s
    dict); ``hardware`` is the profile's hardware name, ``source`` the measurement folder."""
    link, gpu, cpu = m.get("link", {}), m.get("expert_gpu", {}), m.get("expert_cpu", {})
    copy: dict = {}
    for t in link.get("transfers", []):
        s = sigma_of(t["event_ms"])
        if s is not None:
            copy.setdefault(f"{t['direction'].lower()}_{t['mode']}", {})[int(t["bytes"])] = s
    series = link.get("expert_sized_h2d_series") or {}
    sp = series.get("torch_pinned")
    if isinstance(sp, dict) and "ms" in sp:
        s = sigma_of(sp["ms"])
        if s is not None:
            copy.setdefault("h2d_pinned", {})[int(series["bytes"])] = s
    if not copy:
        raise InputError("no copy-by-size rows (link.json transfers) to take a spread from", source=source)
    ks = []
    for r in gpu.get("rows", []):
        s = sigma_of(r["graph_us"])
        if s is not None:
            ks.append(s * math.sqrt(float(r.get("graph_calls_per_replay", 1))))
    if not ks:
        raise InputError("no GPU expert rows (expert_gpu.json) to take a kernel spread from", source=source)
    cs = [s for r in cpu.get("rows", []) if (s := sigma_of(r["ms"])) is not None]
    return {
        "kind": SPREAD_KIND,
        "format_version": FORMAT_VERSION,
        "hardware": hardware,
        "measurements": source,
        "distribution": ("lognormal multiplier with median 1 on each modelled time: exp(sigma * z), z ~ N(0,1); "
                         "sigma = ln(p90/p10) / (2 * 1.2816) of the measured repetitions"),
        "copy": {k: [[b, _r(v[b])] for b in sorted(v)] for k, v in sorted(copy.items())},
        "gpu_kernel": {
            "sigma": _r(float(np.median(ks))),
            "rows": len(ks),
            "how": "median over expert_gpu.json rows of the graph_us spread x sqrt(calls per replay)",
        },
        "cpu_expert": {
            "sigma": _r(float(np.median(cs))) if cs else 0.0,
            "rows": len(cs),
            "how": "median over expert_cpu.json rows of the per-call wall-time spread"
                   + ("" if cs else " (no rows: 0)"),
        },
    }


def render_spread(spread: dict) -> str:
    """The committed text of a spread profile (indented JSON, tables one row per line)."""
    text = json.dumps(spread, indent=1)
    return re.sub(r"\[\s+(\d+),\s+([-+.\deE]+)\s+\]", r"[\1, \2]", text) + "\n"


# ----- loading ---------------------------------------------------------------------------------------
def bundled_spread_path(hardware: str) -> Path:
    """Where the spread profile of a bundled hardware preset lives (``moesim/perf/tables``)."""
    return Path(str(resources.files("moesim.perf").joinpath("tables", f"{hardware}-spread.json")))


def validate_spread(spread, source: str) -> dict:
    """Check a spread profile's layout; InputError naming the file and field otherwise."""
    if not isinstance(spread, dict) or spread.get("kind") != SPREAD_KIND:
        raise InputError(f"not a spread profile (expected kind: {SPREAD_KIND!r})", source=source, field="kind")
    for comp in ("gpu_kernel", "cpu_expert"):
        s = (spread.get(comp) or {}).get("sigma")
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not s >= 0:
            raise InputError("expected a number >= 0", source=source, field=f"{comp}.sigma")
    copy = spread.get("copy")
    if not isinstance(copy, dict) or not copy:
        raise InputError("expected tables by direction (h2d_pinned, ...)", source=source, field="copy")
    for k, rows in copy.items():
        if k not in COPY_KEYS:
            raise InputError(f"unknown copy kind {k!r}; valid: {', '.join(COPY_KEYS)}", source=source, field="copy")
        ok = isinstance(rows, list) and rows and all(
            isinstance(r, list) and len(r) == 2 and r[0] > 0 and r[1] >= 0 for r in rows)
        if not ok:
            raise InputError("expected [[bytes > 0, sigma >= 0], ...]", source=source, field=f"copy.{k}")
    return spread


def load_spread(path: str | Path | None, hardware: str) -> tuple[dict, str]:
    """The spread profile at ``path``, or the bundled one of hardware ``hardware``; returns
    ``(spread, where it came from)``."""
    if path is None:
        p = bundled_spread_path(hardware)
        if not p.is_file():
            raise InputError(
                f"no measured spread for hardware {hardware!r}; pass --spread FILE (written by "
                "`moesim validate fit`)", source="--replicas")
        src = f"moesim/perf/tables/{p.name}"
    else:
        p = Path(path)
        src = str(path)
        if not p.is_file():
            raise InputError("file not found", source=src, field="--spread")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON ({exc})", source=src) from None
    return validate_spread(data, src), src


def zero_spread(hardware: str = "any") -> dict:
    """A spread profile with every sigma 0 (replicas equal the plain run)."""
    return {"kind": SPREAD_KIND, "format_version": FORMAT_VERSION, "hardware": hardware,
            "copy": {k: [[1, 0.0]] for k in COPY_KEYS}, "gpu_kernel": {"sigma": 0.0}, "cpu_expert": {"sigma": 0.0}}


# ----- sampling ----------------------------------------------------------------------------------------
class _Stream:
    """Lognormal multipliers exp(sigma * z) drawn a block at a time from one generator."""

    __slots__ = ("rng", "sigma", "buf", "i")

    def __init__(self, seq: np.random.SeedSequence, sigma: float):
        self.rng = np.random.default_rng(seq)
        self.sigma = float(sigma)
        self.buf: list = []
        self.i = 0

    def _fill(self) -> None:
        z = self.rng.standard_normal(BLOCK)
        self.buf = np.exp(self.sigma * z).tolist() if self.sigma > 0 else [1.0] * BLOCK
        self.i = 0

    def __call__(self) -> float:
        if self.i >= len(self.buf):
            self._fill()
        v = self.buf[self.i]
        self.i += 1
        return v


class ReplicaNoise:
    """The multipliers of one replica: ``kernel()`` per GPU op, ``copy(nbytes, direction)`` per
    copy, ``cpu()`` per CPU expert. ``pageable`` picks the host-memory kind of the copy tables;
    ``scale`` multiplies every sigma (a what-if: 0 = no spread, 2 = twice the measured)."""

    def __init__(self, spread: dict, seed: int, *, pageable: bool = False, scale: float = 1.0):
        if scale < 0:
            raise InputError("expected a number >= 0", source="--spread-scale")
        kseq, cseq, pseq = np.random.SeedSequence([int(seed), NOISE_TAG]).spawn(3)
        self.kernel = _Stream(kseq, scale * float(spread["gpu_kernel"]["sigma"]))
        self.cpu = _Stream(pseq, scale * float(spread["cpu_expert"]["sigma"]))
        self._zrng = np.random.default_rng(cseq)
        self._zbuf: list = []
        self._zi = 0
        kind = "pageable" if pageable else "pinned"
        copy = spread["copy"]
        self._tables = {}
        for d in ("h2d", "d2h"):
            rows = copy.get(f"{d}_{kind}") or copy.get(f"{d}_pinned") or copy.get("h2d_pinned")
            if rows is None:  # any table at all
                rows = next(iter(copy.values()))
            xs = [math.log(float(b)) for b, _ in rows]
            ys = [scale * float(s) for _, s in rows]
            self._tables[d] = (xs, ys)
        self._sig: dict = {}

    def copy_sigma(self, nbytes: int, direction: str = "h2d") -> float:
        """The sigma of a ``nbytes`` copy in ``direction`` (log-size interpolation, clamped)."""
        key = (direction, nbytes)
        s = self._sig.get(key)
        if s is None:
            xs, ys = self._tables[direction]
            x = math.log(max(float(nbytes), 1.0))
            if x <= xs[0]:
                s = ys[0]
            elif x >= xs[-1]:
                s = ys[-1]
            else:
                j = bisect_left(xs, x)
                w = (x - xs[j - 1]) / (xs[j] - xs[j - 1])
                s = ys[j - 1] + w * (ys[j] - ys[j - 1])
            self._sig[key] = s
        return s

    def copy(self, nbytes: int, direction: str = "h2d") -> float:
        """The multiplier of one copy of ``nbytes`` bytes."""
        s = self.copy_sigma(nbytes, direction)
        i = self._zi
        if i >= len(self._zbuf):
            self._zbuf = self._zrng.standard_normal(BLOCK).tolist()
            i = 0
        self._zi = i + 1
        return math.exp(s * self._zbuf[i]) if s > 0 else 1.0


# ----- replicated runs -----------------------------------------------------------------------------------
def run_replicas(scenario, n: int, spread: dict, *, scale: float = 1.0, source: str = "scenario") -> list[dict]:
    """Summaries of ``n`` replicas of the single-GPU ``scenario``, replica ``i`` seeded with
    ``scenario.seed + i``. Each replica is a full run (prepared afresh: policies keep state)."""
    from moesim.config.loader import scenario_hash
    from moesim.engine.build import prepare
    from moesim.metrics.summary import build_summary

    if n < 1:
        raise InputError("expected a whole number >= 1", source="--replicas")
    if getattr(scenario, "cluster", None) is not None:
        raise InputError("replicas are modelled for single-GPU scenarios (no cluster block)", source=source,
                         field="--replicas")
    out = []
    pageable = scenario.runtime.host_memory == "pageable"
    for i in range(n):
        prep = prepare(scenario, source=source, record_timeline=False)
        prep.engine.noise = ReplicaNoise(spread, scenario.seed + i, pageable=pageable, scale=scale)
        res = prep.engine.run()
        h = scenario_hash(scenario, prep.trace_sha256)
        out.append(build_summary(prep, res, scenario_hash=h, wall_time_s=0.0))
    return out


def band(values) -> dict:
    """``{p10, p50, p90}`` of ``values`` (linear interpolation)."""
    p10, p50, p90 = np.percentile(np.asarray(values, dtype=np.float64), [10, 50, 90])
    return {"p10": float(p10), "p50": float(p50), "p90": float(p90)}


def uncertainty_block(replicas: list[dict], *, seed: int, spread_source: str, spread: dict,
                      scale: float = 1.0) -> dict:
    """``summary.json``'s ``uncertainty`` block: bands over replicas and each replica's figures."""
    usable = [s for s in replicas if s.get("tpot_ms")]
    bands = {k: band([f(s) for s in usable]) for k, f in BAND_METRICS.items()} if usable else {}
    return {
        "replicas": len(replicas),
        "seeds": [seed + i for i in range(len(replicas))],
        "spread": spread_source,
        "spread_scale": float(scale),
        "sigma": {"gpu_kernel": scale * float(spread["gpu_kernel"]["sigma"]),
                  "cpu_expert": scale * float(spread["cpu_expert"]["sigma"])},
        "bands": bands,
        "per_replica": [
            {"seed": seed + i, **{k: float(f(s)) for k, f in BAND_METRICS.items()}}
            for i, s in enumerate(replicas) if s.get("tpot_ms")
        ],
        "note": ("p10/p50/p90 over replicas; each replica scales every copy, GPU op and CPU expert by a lognormal "
                 "multiplier (median 1) with the measured spread; routing and policies are the same in every replica"),
    }


def band_line(block: dict) -> str:
    """One line for the terminal: the TPOT bands."""
    b = block["bands"]
    if not b:
        return f"replicas   {block['replicas']}: no decode tokens measured"
    m, p = b["tpot_mean_ms"], b["tpot_p90_ms"]
    return (f"replicas   {block['replicas']} (spread {block['spread']}): mean TPOT ms p10 {m['p10']:.3f} / p50 "
            f"{m['p50']:.3f} / p90 {m['p90']:.3f}; token p90 ms {p['p10']:.3f} / {p['p50']:.3f} / {p['p90']:.3f}")
