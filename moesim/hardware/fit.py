"""Fit hardware-model parameters from component measurements of one GPU machine.

The input is a measurement folder laid out like ``validate/measurements/external/h100-sxm/``
(``env.json``, ``link.json``, ``expert_gpu.json``, ``expert_cpu.json``; see its README). Each
``fit_*`` function turns one part of it into parameters of
:class:`moesim.hardware.spec.HardwareSpec`; :func:`fit_h100` collects them under their dotted spec paths (``"link.h2d_bandwidth_gb_s"``) rounded
to :data:`SIG_DIGITS` significant digits, which is what the preset
``moesim/hardware/presets/h100-sxm-pcie5.yaml`` holds (a test keeps the two equal).
:func:`fit_report` gives the unrounded values plus diagnostics (residuals, alternatives not chosen).

Units follow the spec: GB/s = 1e9 bytes/s, ``_us`` = microseconds, ``_gib`` = 2**30 bytes.

Run ``python -m moesim.hardware.fit [DIR]`` to print the fitted values as YAML.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from moesim.errors import InputError

#: significant digits kept in fitted values (the medians' own run-to-run noise is larger)
SIG_DIGITS = 4
#: H100 SXM5 dense BF16 tensor peak, TFLOP/s (NVIDIA H100 Tensor Core GPU Architecture whitepaper)
H100_PEAK_BF16_TFLOPS = 989.4
#: H100 SXM5 peak HBM3 bandwidth, GB/s (NVIDIA H100 datasheet: 3.35 TB/s)
H100_PEAK_HBM_GB_S = 3350.0
#: kernels of one eager SwiGLU expert call: three GEMMs, SiLU, multiply
EXPERT_GEMMS = 3
EXPERT_ELEMENTWISE = 2
EXPERT_KERNELS = EXPERT_GEMMS + EXPERT_ELEMENTWISE
#: token counts treated as memory-bound when fitting the HBM line (arithmetic intensity <= 16
#: FLOP/byte, far below the H100 ridge point of about 290 FLOP/byte)
MEMORY_BOUND_MAX_TOKENS = 16
#: expert shapes whose eager rows fit ``host.eager_op_us``; the other shapes' rows are held out
#: (chosen because their eager calls are launch-bound at every token count up to 256 or more)
EAGER_FIT_SHAPES = ("olmoe", "deepseek-v3")
#: an eager row counts as launch-bound (its time per call is the host's) when eager >= this x graph
LAUNCH_BOUND_RATIO = 1.25
#: CPU expert shape on which the CPU compute efficiency and bf16 weight passes are fitted (others held out)
CPU_FIT_SHAPE = "mixtral"
#: the measured host's assumed CPU peaks, GFLOP/s (h100-sxm-pcie5 preset: 16 cores x 2.1 GHz x 64 FP32
#: FLOP/cycle with AVX-512 FMA, x 1024 BF16 FLOP/cycle with AMX; see the preset's sources)
HOST_PEAK_GFLOPS_FP32 = 2150.0
HOST_PEAK_GFLOPS_BF16 = 34410.0
FILES = ("env.json", "link.json", "expert_gpu.json", "expert_cpu.json")
MEAS_REL = "validate/measurements/external/h100-sxm"

_DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


# ----- loading ---------------------------------------------------------------------------------
def default_measurement_dir() -> Path:
    """The H100 measurement folder committed in the repository (``validate/measurements/...``)."""
    here = Path(__file__).resolve().parents[2] / MEAS_REL
    if here.is_dir():
        return here
    try:  # installed distribution that ships validate/ as a package
        from importlib import resources

        cand = Path(str(resources.files("validate"))) / "measurements" / "external" / "h100-sxm"
        if cand.is_dir():
            return cand
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - depends on the install
        pass
    return here


def load_measurements(path: str | Path | None = None) -> dict[str, dict]:
    """Read the four JSON files of a measurement folder into ``{"env": ..., "link": ..., ...}``."""
    root = Path(path) if path is not None else default_measurement_dir()
    out = {}
    for fname in FILES:
        f = root / fname
        if not f.is_file():
            raise InputError(f"measurement file missing (expected {', '.join(FILES)})", source=str(f))
        try:
            out[fname[:-5]] = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON ({exc.msg} at line {exc.lineno})", source=str(f)) from None
    return out


# ----- helpers ---------------------------------------------------------------------------------
def round_sig(x: float, digits: int = SIG_DIGITS) -> float:
    """``x`` rounded to ``digits`` significant digits (0 stays 0)."""
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(f"{x:.{digits}g}")


def _spread(stats: dict) -> float:
    """Noise scale of a timing row: p90 - p10 (falls back to 0.1% of the median)."""
    s = float(stats["p90"]) - float(stats["p10"])
    return s if s > 0 else 1e-3 * float(stats["median"])


def _wls(A: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted linear least squares: minimise sum((w * (A @ c - y))**2)."""
    coef, *_ = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)
    return coef


# ----- link ------------------------------------------------------------------------------------
def fit_pinned_link(link: dict) -> dict:
    """Per-transfer setup (µs) and pinned H2D/D2H rates (GB/s) from ``link.json`` transfers.

    Model: ``event_time = setup + bytes / rate_direction``, one setup shared by both directions,
    fitted to the event-time medians of all pinned transfers (4 KiB ... 1 GiB) by weighted linear
    least squares, each point weighted by ``1 / (p90 - p10)`` of its own repetitions. Plain least
    squares would let microsecond-scale noise of the 1 GiB copies decide the setup time; weighting
    by the inverse of the relative error would let the small copies pull the rate. With the
    measured spread as the noise scale the large copies fix the rates and the 256 KiB ... 4 MiB
    copies fix the setup. Event (GPU) time is used: it excludes the harness's synchronize round
    trip, which the host wall time contains. Note the setup may include part of the host's issue
    time of the copy (the start event can fire before the copy is enqueued).
    """
    rows = [t for t in link["transfers"] if t["mode"] == "pinned"]
    n = np.array([t["bytes"] for t in rows], dtype=np.float64)
    y = np.array([t["event_ms"]["median"] for t in rows]) * 1e-3
    w = 1.0 / (np.array([_spread(t["event_ms"]) for t in rows]) * 1e-3)
    h2d = np.array([t["direction"] == "H2D" for t in rows], dtype=np.float64)
    A = np.column_stack([np.ones_like(n), n * h2d, n * (1.0 - h2d)])
    c = _wls(A, y, w)
    pred = A @ c
    return {
        "setup_us": float(c[0] * 1e6),
        "h2d_gb_s": float(1.0 / c[1] / 1e9),
        "d2h_gb_s": float(1.0 / c[2] / 1e9),
        "residuals": [
            {"direction": t["direction"], "bytes": t["bytes"], "measured_us": float(yi * 1e6),
             "rel_err": float((p - yi) / yi)}
            for t, yi, p in zip(rows, y, pred)
        ],
    }


def fit_pageable_table(link: dict, direction: str, setup_us: float) -> list[list[float]]:
    """``[[size_bytes, GB/s], ...]`` of pageable copies in ``direction`` ("H2D"/"D2H").

    Each rate is ``bytes / (event_median - setup)``, so that the link model's
    ``setup + bytes / rate`` reproduces the measured median at every measured size. Event time,
    not wall time, is used: a pageable copy does block the host, but the wall time of these runs
    also holds the harness's event record + synchronize round trip (wall - event is about 9-10 µs
    for pinned and pageable copies alike, at every size). The simulator charges that blocking by
    holding the host thread for the copy's duration, and host issue/sync costs separately.
    """
    rows = sorted(
        (t for t in link["transfers"] if t["mode"] == "pageable" and t["direction"] == direction),
        key=lambda t: t["bytes"],
    )
    if not rows:
        raise InputError(f"no pageable {direction} transfers", field="transfers")
    table = []
    for t in rows:
        net_s = t["event_ms"]["median"] * 1e-3 - setup_us * 1e-6
        if net_s <= 0:
            raise InputError(
                f"pageable {direction} {t['bytes']} B median is below the fitted setup", field="transfers"
            )
        table.append([int(t["bytes"]), float(t["bytes"] / net_s / 1e9)])
    return table


def fit_bidirectional_derate(link: dict, h2d_gb_s: float, d2h_gb_s: float, setup_us: float) -> dict:
    """Fraction of the one-way rate kept when both directions copy at once (``bidirectional_pinned``).

    Two 256 MiB copies, one per direction, start together. Each direction's implied derate is
    ``bytes / (rate * (median - setup))``. They differ (H2D keeps far less than D2H), but the
    spec has one factor: it takes the H2D value, which is the smaller one, reproduces the measured
    span (the H2D copy finishes last) and belongs to the direction that loads experts. The D2H value
    is reported alongside.
    """
    b = link["bidirectional_pinned"]
    nbytes = float(b["bytes_each_direction"])
    h = nbytes / (h2d_gb_s * 1e9 * (b["h2d_ms"]["median"] * 1e-3 - setup_us * 1e-6))
    d = nbytes / (d2h_gb_s * 1e9 * (b["d2h_ms"]["median"] * 1e-3 - setup_us * 1e-6))
    return {"derate": float(min(1.0, h)), "h2d": float(h), "d2h": float(d)}


def fit_copy_interference(link: dict) -> dict:
    """Kernel slow-down factors (>= 1) while a 1 GiB copy runs (``concurrent_copy_and_kernel``).

    The memory-bound factor is the 1-token Mixtral expert chain's ``kernel_slowdown`` against an
    H2D copy, the compute-bound one the 8192³ GEMM chain's; H2D is the direction of expert loads.
    The D2H values are reported alongside.
    """
    cases = {(c["kernel"], c["direction"]): c for c in link["concurrent_copy_and_kernel"]["cases"]}

    def get(kernel_prefix: str, direction: str) -> float:
        for (k, d), c in cases.items():
            if k.startswith(kernel_prefix) and d == direction:
                return max(1.0, float(c["kernel_slowdown"]))
        raise InputError(f"no {kernel_prefix} / {direction} case", field="concurrent_copy_and_kernel")

    return {
        "memory_bound_slowdown": get("mixtral_expert", "H2D"),
        "compute_bound_slowdown": get("gemm", "H2D"),
        "memory_bound_slowdown_d2h": get("mixtral_expert", "D2H"),
        "compute_bound_slowdown_d2h": get("gemm", "D2H"),
    }


# ----- host ------------------------------------------------------------------------------------
def fit_host_costs(env: dict) -> dict:
    """Host-thread costs (µs) from ``env.json`` ``host_overheads``.

    * ``launch_us``: host enqueue time per kernel, averaged over the five kernels of one SwiGLU
      expert call: three GEMM launches (measured with a [1,4096]x[4096,4096] bf16 mm) and two
      element-wise launches (measured with a tiny add).
    * ``graph_launch_us``: the host enqueue time of a one-kernel CUDA-graph replay where the data
      has it (``graph_replay_1_kernel``, written by ``moesim validate measure``); otherwise
      assumed equal to one small-kernel enqueue (one launch call through the same Python/driver
      path). ``graph_launch_measured`` says which.
    * ``copy_issue_us``: the host enqueue time of a 4 KiB pinned async copy where measured
      (``h2d_copy_4KiB_pinned_issue``), otherwise one small-kernel enqueue likewise
      (``copy_issue_measured``).
    * ``router_readback_us``: 16-byte pinned device-to-host copy + synchronize from an idle GPU.
    """
    ho = env["host_overheads"]
    tiny = float(ho["tiny_add_"]["host_enqueue_us_per_launch"]["median"])
    mm_key = next(k for k in ho if k.startswith("mm_"))
    mm = float(ho[mm_key]["host_enqueue_us_per_launch"]["median"])
    graph = ho.get("graph_replay_1_kernel")
    issue = ho.get("h2d_copy_4KiB_pinned_issue")
    return {
        "launch_us": (EXPERT_GEMMS * mm + EXPERT_ELEMENTWISE * tiny) / EXPERT_KERNELS,
        "graph_launch_us": float(graph["host_enqueue_us_per_launch"]["median"]) if graph else tiny,
        "copy_issue_us": float(issue["host_enqueue_us_per_launch"]["median"]) if issue else tiny,
        "graph_launch_measured": graph is not None,
        "copy_issue_measured": issue is not None,
        "router_readback_us": float(ho["small_d2h_pinned_plus_sync_idle_us"]["median"]),
        "tiny_kernel_enqueue_us": tiny,
        "gemm_kernel_enqueue_us": mm,
        "tiny_kernel_gpu_us_back_to_back": float(
            ho["tiny_add_"]["gpu_us_per_kernel_back_to_back"]["median"]
        ),
        "event_record_and_synchronize_us": float(ho["event_record_and_synchronize_idle_us"]["median"]),
    }


def fit_host_machine(env: dict, expert_cpu: dict) -> dict:
    """Measured machine facts: GPU memory (GiB), host RAM (GiB), CPU sockets/cores, PCIe link,
    and the highest DRAM read rate (GB/s) the CPU expert runs achieved (a lower bound on the
    DRAM bandwidth available to this VM)."""
    lscpu = env["lscpu"]

    def lscpu_int(key: str) -> int:
        m = re.search(rf"^{re.escape(key)}:\s*(\d+)", lscpu, flags=re.M)
        if not m:
            raise InputError(f"lscpu has no '{key}' line", field="lscpu")
        return int(m.group(1))

    mem_kb = re.search(r"MemTotal:\s*(\d+)\s*kB", env["meminfo"])
    query = (env.get("nvidia_smi_query") or "").splitlines()
    smi = {}  # no nvidia-smi on the measured machine: the PCIe link stays unknown (None)
    if len(query) >= 2:
        smi = dict(zip([s.strip() for s in query[0].split(",")], [s.strip() for s in query[1].split(",")]))
    dram = max(float(r["GBps_weights"]) for r in expert_cpu["rows"])
    return {
        "hbm_gib": env["device"]["total_memory"] / 2**30,
        "capacity_gib": int(mem_kb.group(1)) * 1024 / 2**30,
        "sockets": lscpu_int("Socket(s)"),
        "cores_per_socket": lscpu_int("Core(s) per socket"),
        "threads_per_core": lscpu_int("Thread(s) per core"),
        "pcie_generation": int(smi["pcie.link.gen.current"]) if smi else None,
        "pcie_width": int(smi["pcie.link.width.current"]) if smi else None,
        "dram_read_gb_s": dram,
    }


def eager_fit_shapes(expert_gpu: dict) -> tuple[str, ...]:
    """Shapes whose eager rows :func:`fit_eager_op` uses: :data:`EAGER_FIT_SHAPES` where the data has
    them, else every shape (then no eager row is out of sample)."""
    have = {r["shape"] for r in expert_gpu["rows"]}
    pick = tuple(s for s in EAGER_FIT_SHAPES if s in have)
    return pick or tuple(sorted(have))


def fit_eager_op(expert_gpu: dict, env: dict | None = None) -> dict:
    """Host µs per op of an eager expert call (``host.eager_op_us``) from ``expert_gpu.json``.

    In an eager call of the SwiGLU expert (5 ops: three ``torch.mm``, ``F.silu``, a multiply) that
    is launch-bound, the GPU waits for the host, so the time per call measured back to back
    (``eager_us``) is the host's time for the call's ops: the engine's closed form gives exactly
    ``kernels x eager_op_us`` there. The fit is the median of ``eager_us / 5`` over the launch-bound
    rows (``eager_us >= 1.25 x graph_us``) of :func:`eager_fit_shapes` only; the rows of the other
    shapes stay out of sample. The median, not a mean: the eager medians of one shape jump between
    about 75 and 160 µs from one token count to the next (host noise of the VM), which a mean would
    follow. Also reported: the same cost from the launch microbenchmark (3 GEMM and 2 element-wise
    enqueues, ``host.launch_us`` x 5) and the ratio: a call's ops cost about twice their bare
    enqueue in a tight loop of one repeated op; the rest is framework work per op that such a loop
    does not show (new output tensors for the element-wise ops, the Python wrappers of ``F.silu``
    and ``*``), which this data cannot split further."""
    shapes = eager_fit_shapes(expert_gpu)
    rows = [r for r in expert_gpu["rows"] if r["shape"] in shapes
            and r["eager_us"]["median"] >= LAUNCH_BOUND_RATIO * r["graph_us"]["median"]]
    if not rows:
        raise InputError("no launch-bound eager expert rows to fit host.eager_op_us", field="rows")
    per_op = np.array([r["eager_us"]["median"] / EXPERT_KERNELS for r in rows])
    out = {
        "eager_op_us": float(np.median(per_op)),
        "shapes": list(shapes),
        "rows_used": [f"{r['shape']} n={r['tokens']}" for r in rows],
        "per_op_us_min": float(per_op.min()),
        "per_op_us_max": float(per_op.max()),
    }
    if env is not None:
        enq = fit_host_costs(env)["launch_us"]
        out["enqueue_us_mean"] = enq
        out["ratio_to_enqueue"] = out["eager_op_us"] / enq
    return out


# ----- CPU experts -------------------------------------------------------------------------------
def _cpu_row_terms(r: dict) -> tuple[float, float, float]:
    """(seconds measured, weight bytes, FLOPs) of one ``expert_cpu.json`` row."""
    return (float(r["ms"]["median"]) * 1e-3, float(r["weight_bytes"]),
            2.0 * 3 * r["h"] * r["f"] * r["tokens"])


def cpu_fit_in_sample(r: dict, expert_cpu: dict) -> bool:
    """Whether :func:`fit_cpu_expert` used CPU row ``r``: every 1-token fp32 row (call overhead and
    DRAM rate) and every row of the fitted shape (compute efficiency, bf16 weight passes)."""
    dt = _DTYPE_NAMES.get(r["dtype"], r["dtype"])
    if r["shape"] == _cpu_fit_shape(expert_cpu) and dt in ("fp32", "bf16"):
        return True
    return dt == "fp32" and r["tokens"] == 1


def _cpu_fit_shape(expert_cpu: dict) -> str:
    shapes = {r["shape"] for r in expert_cpu["rows"]}
    if CPU_FIT_SHAPE in shapes:
        return CPU_FIT_SHAPE
    return max(shapes, key=lambda s: max(r["weight_bytes"] for r in expert_cpu["rows"] if r["shape"] == s))


def fit_cpu_expert(expert_cpu: dict, peak_gflops_fp32: float = HOST_PEAK_GFLOPS_FP32,
                   peak_gflops_bf16: float = HOST_PEAK_GFLOPS_BF16) -> dict:
    """CPU expert model parameters from ``expert_cpu.json`` (torch, all threads), for the roofline of
    :meth:`moesim.perf.predictor.Predictor.cpu_expert_times` with ``overlap_compute_and_memory``
    false: ``t = call_overhead + passes x weight_bytes / dram + FLOPs / (peak x efficiency)``.

    * ``call_overhead_us`` and ``dram_gb_s``: the 1-token fp32 rows (one pass over the weights,
      negligible arithmetic) of all shapes, ``t = c0 + bytes / dram`` solved by least squares (exact
      for two shapes): the small expert's lower apparent rate is this fixed per-call cost.
    * ``compute_efficiency``: the fp32 rows of :data:`CPU_FIT_SHAPE` with 2 or more tokens, the one
      unknown of the additive form, by least squares on the relative error (closed form). The time
      grows with tokens long before the roofline's FLOP bound; a max() of the two terms misses the
      2-16 token rows by up to half, their sum by about a tenth.
    * ``bf16_weight_passes``: the bf16 rows of the same shape, likewise. bf16 time does not grow
      with tokens up to 32 (it reaches about 1 TFLOP/s), so no slow arithmetic unit explains it;
      it is about three fp32-rate passes over its weight bytes on every call, whatever the token
      count, as when the weights are re-laid out (read, written, read again) per call; which
      library step does it is not in the data.
    The rows of the other shapes with 2 or more tokens (fp32), and all their bf16 rows, stay out
    of sample."""
    rows = expert_cpu["rows"]
    one = [_cpu_row_terms(r) for r in rows if _DTYPE_NAMES.get(r["dtype"], r["dtype"]) == "fp32" and r["tokens"] == 1]
    if not one:
        raise InputError("no 1-token fp32 CPU expert rows to fit the DRAM rate", field="rows")
    t1 = np.array([t for t, _, _ in one])
    b1 = np.array([b for _, b, _ in one])
    if len(set(b1)) >= 2:
        c0, inv = np.linalg.lstsq(np.column_stack([np.ones_like(b1), b1]), t1, rcond=None)[0]
    else:  # one size: no way to tell a fixed cost from the rate
        c0, inv = 0.0, float(np.mean(t1 / b1))
    c0 = max(0.0, float(c0))
    shape = _cpu_fit_shape(expert_cpu)

    def rel_ls(terms, base, coef):
        # least squares of (base_i + coef_i * x - t_i) / t_i over x (closed form)
        a = np.array([coef(b, f) / t for t, b, f in terms])
        y = np.array([(t - base(b, f)) / t for t, b, f in terms])
        return float(a @ y / (a @ a))

    fp = [_cpu_row_terms(r) for r in rows if r["shape"] == shape and r["tokens"] >= 2
          and _DTYPE_NAMES.get(r["dtype"], r["dtype"]) == "fp32"]
    if not fp:
        raise InputError(f"no fp32 CPU expert rows of {shape} with 2+ tokens to fit the compute efficiency", field="rows")
    x = rel_ls(fp, lambda b, f: c0 + b * inv, lambda b, f: f)  # seconds per FLOP
    eff = 1.0 / (x * peak_gflops_fp32 * 1e9)
    bf = [_cpu_row_terms(r) for r in rows if r["shape"] == shape and _DTYPE_NAMES.get(r["dtype"], r["dtype"]) == "bf16"]
    rate16 = peak_gflops_bf16 * 1e9 * eff
    passes = rel_ls(bf, lambda b, f: c0 + f / rate16, lambda b, f: b * inv) if bf else 1.0
    return {
        "call_overhead_us": c0 * 1e6,
        "dram_gb_s": float(1.0 / inv / 1e9),
        "compute_efficiency": eff,
        "fp32_gflops": peak_gflops_fp32 * eff,
        "bf16_weight_passes": max(1.0, passes),
        "fit_shape": shape,
        "max_weight_read_gb_s": max(float(r["GBps_weights"]) for r in rows),
    }


# ----- GPU -------------------------------------------------------------------------------------
def expert_bytes_moved(row: dict, bytes_per_param: int = 2) -> float:
    """Bytes one expert call moves in the roofline model: weights plus n*(2h + 3f) activations."""
    return row["weight_bytes"] + row["tokens"] * (2 * row["h"] + 3 * row["f"]) * bytes_per_param


def fit_gpu_memory_line(expert_gpu: dict, peak_gb_s: float = H100_PEAK_HBM_GB_S) -> dict:
    """HBM efficiency and per-kernel fixed time (µs) from memory-bound expert graph times.

    Rows with at most :data:`MEMORY_BOUND_MAX_TOKENS` tokens of all four shapes (12 MB ... 352 MB of
    weights) are fitted with ``graph_time = 5 * kernel_fixed + bytes / (peak * efficiency)``, the
    predictor's roofline for a 5-kernel expert, by weighted least squares (weights
    ``1 / (p90 - p10)``). The slope gives the achieved bandwidth, the intercept the fixed GPU time
    of the five kernels (launch-free: CUDA-graph replay). This describes the measured small-expert
    times far better than one achieved-GB/s ratio, which would charge the fixed time to bandwidth.
    """
    rows = [r for r in expert_gpu["rows"] if r["tokens"] <= MEMORY_BOUND_MAX_TOKENS]
    b = np.array([expert_bytes_moved(r) for r in rows])
    y = np.array([r["graph_us"]["median"] for r in rows]) * 1e-6
    w = 1.0 / (np.array([_spread(r["graph_us"]) for r in rows]) * 1e-6)
    A = np.column_stack([np.ones_like(b), b])
    c = _wls(A, y, w)
    pred = A @ c
    achieved = float(1.0 / c[1] / 1e9)
    return {
        "kernel_fixed_us": float(c[0] * 1e6 / EXPERT_KERNELS),
        "achieved_gb_s": achieved,
        "memory_efficiency": achieved / peak_gb_s,
        "max_abs_rel_err": float(np.max(np.abs((pred - y) / y))),
        "simple_ratio_mixtral_1tok": float(
            next(r["GBps"] for r in expert_gpu["rows"] if r["shape"] == "mixtral" and r["tokens"] == 1)
            / peak_gb_s
        ),
    }


def fit_compute_efficiency(
    env: dict, expert_gpu: dict, peak_tflops: float = H100_PEAK_BF16_TFLOPS
) -> dict:
    """Compute efficiency: achieved TFLOP/s of the 8192³ bf16 GEMM over the dense bf16 peak.

    Also reported: the best efficiency of the expert calls themselves (4096 tokens), lower than
    the GEMM's because their GEMMs are smaller and run back to back with element-wise kernels.
    """
    gemm = float(env["gemm_bf16"]["TFLOPs"])
    best_expert = max(float(r["TFLOPs"]) for r in expert_gpu["rows"])
    return {
        "compute_efficiency": gemm / peak_tflops,
        "gemm_tflops": gemm,
        "best_expert_efficiency": best_expert / peak_tflops,
    }


# ----- everything ------------------------------------------------------------------------------
def fit_report(path: str | Path | None = None, *, peak_tflops: float = H100_PEAK_BF16_TFLOPS,
               peak_hbm_gb_s: float = H100_PEAK_HBM_GB_S, cpu_peak_gflops_fp32: float = HOST_PEAK_GFLOPS_FP32,
               cpu_peak_gflops_bf16: float = HOST_PEAK_GFLOPS_BF16) -> dict:
    """All fitted quantities, unrounded, with diagnostics; keyed by part (``link``, ``host``...).
    ``peak_tflops`` (dense bf16) and ``peak_hbm_gb_s`` are the GPU's spec-sheet peaks the
    efficiencies are relative to (default: H100 SXM); ``cpu_peak_gflops_*`` the host CPU's (default:
    the measured H100 host's assumed peaks)."""
    m = load_measurements(path)
    pin = fit_pinned_link(m["link"])
    report = {
        "pinned": pin,
        "pageable_h2d_gb_s": fit_pageable_table(m["link"], "H2D", pin["setup_us"]),
        "pageable_d2h_gb_s": fit_pageable_table(m["link"], "D2H", pin["setup_us"]),
        "bidirectional": fit_bidirectional_derate(
            m["link"], pin["h2d_gb_s"], pin["d2h_gb_s"], pin["setup_us"]
        ),
        "interference": fit_copy_interference(m["link"]),
        "host": fit_host_costs(m["env"]),
        "machine": fit_host_machine(m["env"], m["expert_cpu"]),
        "memory": fit_gpu_memory_line(m["expert_gpu"], peak_hbm_gb_s),
        "compute": fit_compute_efficiency(m["env"], m["expert_gpu"], peak_tflops),
        "eager": fit_eager_op(m["expert_gpu"], m["env"]),
        "cpu_expert": fit_cpu_expert(m["expert_cpu"], cpu_peak_gflops_fp32, cpu_peak_gflops_bf16),
    }
    series = m["link"]["expert_sized_h2d_series"]
    n = series["bytes"]
    report["check_expert_sized_h2d"] = {
        "bytes": n,
        "measured_ms": series["torch_pinned"]["ms"]["median"],
        "predicted_ms": float((pin["setup_us"] * 1e-6 + n / (pin["h2d_gb_s"] * 1e9)) * 1e3),
    }
    return report


def fit_h100(path: str | Path | None = None, *, peak_tflops: float = H100_PEAK_BF16_TFLOPS,
             peak_hbm_gb_s: float = H100_PEAK_HBM_GB_S, cpu_peak_gflops_fp32: float = HOST_PEAK_GFLOPS_FP32,
             cpu_peak_gflops_bf16: float = HOST_PEAK_GFLOPS_BF16) -> dict:
    """Fitted HardwareSpec values keyed by dotted path, rounded to :data:`SIG_DIGITS` digits.

    Units are those of the spec fields (GB/s, µs, GiB, dimensionless factors); integer facts
    (cores, PCIe generation and width) stay integers; pageable tables are ``[[bytes, GB/s], ...]``.
    ``path`` is the measurement folder (default: the committed H100 data)."""
    r = fit_report(path, peak_tflops=peak_tflops, peak_hbm_gb_s=peak_hbm_gb_s,
                   cpu_peak_gflops_fp32=cpu_peak_gflops_fp32, cpu_peak_gflops_bf16=cpu_peak_gflops_bf16)
    pin, host, mach, mem, ce = r["pinned"], r["host"], r["machine"], r["memory"], r["cpu_expert"]
    inter = r["interference"]

    def table(rows):
        return [[int(s), round_sig(b)] for s, b in rows]

    return {
        "gpu.hbm_gib": round_sig(mach["hbm_gib"]),
        "gpu.memory_efficiency": round_sig(mem["memory_efficiency"]),
        "gpu.compute_efficiency": round_sig(r["compute"]["compute_efficiency"]),
        "gpu.kernel_fixed_us": round_sig(mem["kernel_fixed_us"]),
        "gpu.copy_interference.memory_bound_slowdown": round_sig(inter["memory_bound_slowdown"]),
        "gpu.copy_interference.compute_bound_slowdown": round_sig(inter["compute_bound_slowdown"]),
        "host.launch_us": round_sig(host["launch_us"]),
        "host.eager_op_us": round_sig(r["eager"]["eager_op_us"]),
        "host.graph_launch_us": round_sig(host["graph_launch_us"]),
        "host.copy_issue_us": round_sig(host["copy_issue_us"]),
        "host.router_readback_us": round_sig(host["router_readback_us"]),
        "cpu.sockets": mach["sockets"],
        "cpu.cores_per_socket": mach["cores_per_socket"],
        "cpu.dram_bandwidth_gb_s": round_sig(ce["dram_gb_s"]),
        "cpu.compute_efficiency": round_sig(ce["compute_efficiency"]),
        "cpu.call_overhead_us": round_sig(ce["call_overhead_us"]),
        "cpu.weight_passes.bf16": round_sig(ce["bf16_weight_passes"]),
        "cpu.overlap_compute_and_memory": False,
        "host_memory.capacity_gib": round_sig(mach["capacity_gib"]),
        "host_memory.pageable_h2d_gb_s": table(r["pageable_h2d_gb_s"]),
        "host_memory.pageable_d2h_gb_s": table(r["pageable_d2h_gb_s"]),
        "link.generation": mach["pcie_generation"],
        "link.width": mach["pcie_width"],
        "link.h2d_bandwidth_gb_s": round_sig(pin["h2d_gb_s"]),
        "link.d2h_bandwidth_gb_s": round_sig(pin["d2h_gb_s"]),
        "link.setup_us": round_sig(pin["setup_us"]),
        "link.bidirectional_derate": round_sig(r["bidirectional"]["derate"]),
    }


_FIT = "fit by moesim.hardware.fit"
#: where each value of :func:`fit_h100` comes from (used as the preset's ``sources`` entries)
FIT_SOURCES: dict[str, str] = {
    "gpu.hbm_gib": f"{MEAS_REL}/env.json device.total_memory (torch), measured",
    "gpu.memory_efficiency": (
        f"{MEAS_REL}/expert_gpu.json, {_FIT}: slope of graph time vs bytes of memory-bound expert "
        "calls (<= 16 tokens, 4 shapes) / 3350 GB/s peak (H100 SXM datasheet)"
    ),
    "gpu.compute_efficiency": (
        f"{MEAS_REL}/env.json gemm_bf16 (8192^3) TFLOP/s, {_FIT}, / 989.4 TFLOP/s dense bf16 peak "
        "(H100 whitepaper)"
    ),
    "gpu.kernel_fixed_us": (
        f"{MEAS_REL}/expert_gpu.json, {_FIT}: intercept of graph time vs bytes of memory-bound "
        "expert calls / 5 kernels"
    ),
    "gpu.copy_interference.memory_bound_slowdown": (
        f"{MEAS_REL}/link.json concurrent_copy_and_kernel (1-token Mixtral expert chain vs 1 GiB H2D "
        f"copy), {_FIT}"
    ),
    "gpu.copy_interference.compute_bound_slowdown": (
        f"{MEAS_REL}/link.json concurrent_copy_and_kernel (8192^3 GEMM chain vs 1 GiB H2D copy), {_FIT}"
    ),
    "host.launch_us": (
        f"{MEAS_REL}/env.json host_overheads host_enqueue_us_per_launch, {_FIT}: mean over one expert's "
        "kernels (3 GEMM launches + 2 element-wise launches)"
    ),
    "host.eager_op_us": (
        f"{MEAS_REL}/expert_gpu.json eager_us, {_FIT}: median of eager_us / 5 ops over the launch-bound "
        "rows (eager >= 1.25 x graph) of the olmoe and deepseek-v3 shapes; the other shapes are held out"
    ),
    "host.graph_launch_us": (
        f"assumption: not measured; equal to the measured enqueue of one small kernel "
        f"({MEAS_REL}/env.json host_overheads.tiny_add_, {_FIT})"
    ),
    "host.copy_issue_us": (
        f"assumption: not measured; equal to the measured enqueue of one small kernel "
        f"({MEAS_REL}/env.json host_overheads.tiny_add_, {_FIT})"
    ),
    "host.router_readback_us": (
        f"{MEAS_REL}/env.json host_overheads.small_d2h_pinned_plus_sync_idle_us median, {_FIT}"
    ),
    "cpu.sockets": f"{MEAS_REL}/env.json lscpu, measured",
    "cpu.cores_per_socket": f"{MEAS_REL}/env.json lscpu (16 vCPUs, 1 thread per core), measured",
    "cpu.dram_bandwidth_gb_s": (
        f"{MEAS_REL}/expert_cpu.json, {_FIT}: slope of time vs weight bytes of the 1-token fp32 rows "
        "(Mixtral 705 MB, Qwen-MoE 35 MB; one pass over the weights), t = call overhead + bytes / rate"
    ),
    "cpu.call_overhead_us": (
        f"{MEAS_REL}/expert_cpu.json, {_FIT}: intercept of time vs weight bytes of the 1-token fp32 "
        "rows (fixed cost of one 5-op torch expert call on 16 threads)"
    ),
    "cpu.compute_efficiency": (
        f"{MEAS_REL}/expert_cpu.json, {_FIT}: fp32 Mixtral rows with 2-32 tokens, least squares (relative "
        "error) of call overhead + bytes / dram + FLOPs / (2150 GFLOP/s assumed fp32 peak x efficiency), "
        "arithmetic and weight streaming not overlapped"
    ),
    "cpu.weight_passes.bf16": (
        f"{MEAS_REL}/expert_cpu.json, {_FIT}: bf16 Mixtral rows (1-32 tokens), least squares (relative "
        "error) of the weight passes at the fitted DRAM rate; bf16 time is flat in tokens, about three "
        "passes over the weights per call"
    ),
    "cpu.overlap_compute_and_memory": (
        f"{MEAS_REL}/expert_cpu.json, {_FIT}: false, the form the CPU fit uses (fp32 time grows with "
        "tokens well below the FLOP bound)"
    ),
    "host_memory.capacity_gib": f"{MEAS_REL}/env.json meminfo MemTotal, measured",
    "host_memory.pageable_h2d_gb_s": (
        f"{MEAS_REL}/link.json transfers (pageable H2D event-time medians), {_FIT}: "
        "bytes / (median - setup_us)"
    ),
    "host_memory.pageable_d2h_gb_s": (
        f"{MEAS_REL}/link.json transfers (pageable D2H event-time medians), {_FIT}: "
        "bytes / (median - setup_us)"
    ),
    "link.generation": f"{MEAS_REL}/env.json nvidia_smi_query pcie.link.gen.current, measured",
    "link.width": f"{MEAS_REL}/env.json nvidia_smi_query pcie.link.width.current, measured",
    "link.h2d_bandwidth_gb_s": (
        f"{MEAS_REL}/link.json transfers (pinned, event time), {_FIT}: weighted least squares "
        "setup + bytes/rate"
    ),
    "link.d2h_bandwidth_gb_s": (
        f"{MEAS_REL}/link.json transfers (pinned, event time), {_FIT}: weighted least squares "
        "setup + bytes/rate"
    ),
    "link.setup_us": (
        f"{MEAS_REL}/link.json transfers (pinned, event time), {_FIT}: intercept shared by H2D and D2H"
    ),
    "link.bidirectional_derate": (
        f"{MEAS_REL}/link.json bidirectional_pinned, {_FIT}: H2D direction's kept fraction "
        "(D2H keeps more)"
    ),
}


# ----- measured expert-time tables for moesim/perf/tables ----------------------------------------
def _r3(x: float) -> float:
    return round(float(x), 3)


def expert_gpu_table(path: str | Path | None = None) -> dict:
    """Compact GPU expert-time table (µs medians by shape and tokens) from ``expert_gpu.json``."""
    m = load_measurements(path)
    g, env = m["expert_gpu"], m["env"]
    rows = [
        {
            "shape": r["shape"],
            "h": r["h"],
            "f": r["f"],
            "tokens": r["tokens"],
            "graph_us": _r3(r["graph_us"]["median"]),
            "eager_us": _r3(r["eager_us"]["median"]),
            "eager_sync_wall_us": _r3(r["eager_sync_wall_us"]["median"]),
        }
        for r in g["rows"]
    ]
    rows.sort(key=lambda r: (r["shape"], r["tokens"]))
    return {
        "source": f"{MEAS_REL}/expert_gpu.json (medians), extracted by "
        "moesim.hardware.fit.expert_gpu_table",
        "device": env["device"]["name"],
        "dtype": _DTYPE_NAMES.get(g["dtype"], g["dtype"]),
        "op": g["op"],
        "kernels": EXPERT_KERNELS,
        "units": {
            "graph_us": "GPU time per call from CUDA-graph replay (no launch gaps)",
            "eager_us": "per call, eager calls enqueued back to back (includes launch gaps)",
            "eager_sync_wall_us": "host wall time of one call + synchronize from an idle GPU",
        },
        "rows": rows,
    }


def expert_cpu_table(path: str | Path | None = None) -> dict:
    """Compact host-CPU expert-time table (ms medians by dtype, shape, tokens) from ``expert_cpu.json``."""
    m = load_measurements(path)
    c = m["expert_cpu"]
    threads = int(c.get("torch_num_threads_used", c.get("torch_num_threads_default", 0)))
    rows = [
        {
            "dtype": _DTYPE_NAMES.get(r["dtype"], r["dtype"]),
            "shape": r["shape"],
            "h": r["h"],
            "f": r["f"],
            "tokens": r["tokens"],
            "ms": round(float(r["ms"]["median"]), 4),
            "threads": threads,
        }
        for r in c["rows"]
    ]
    rows.sort(key=lambda r: (r["dtype"], r["shape"], r["tokens"]))
    return {
        "source": f"{MEAS_REL}/expert_cpu.json (medians), extracted by "
        "moesim.hardware.fit.expert_cpu_table",
        "device": c["cpu_model"].split(":", 1)[-1].strip() + f", {threads} threads (16-vCPU KVM guest)",
        "op": c["op"],
        "units": {"ms": "host wall time per call, weights cycled to defeat the caches"},
        "rows": rows,
    }


TABLE_FILES = {
    "h100-sxm-bf16-expert.json": expert_gpu_table,
    "h100-host-cpu-expert.json": expert_cpu_table,
}


def table_dir() -> Path:
    """The folder of measured profile tables, ``moesim/perf/tables``."""
    return Path(__file__).resolve().parents[1] / "perf" / "tables"


def render_table(table: dict) -> str:
    """The committed text of a table: JSON with one row per line."""
    head = {k: v for k, v in table.items() if k != "rows"}
    lines = json.dumps(head, indent=1)[:-2].rstrip("\n") + ',\n "rows": [\n'
    lines += ",\n".join("  " + json.dumps(r) for r in table["rows"])
    return lines + "\n ]\n}\n"


def write_tables(path: str | Path | None = None, out_dir: str | Path | None = None) -> list[Path]:
    """Regenerate the measured expert tables into ``out_dir`` (default ``moesim/perf/tables``)."""
    out = Path(out_dir) if out_dir is not None else table_dir()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, build in TABLE_FILES.items():
        target = out / fname
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(render_table(build(path)), encoding="utf-8")
        tmp.replace(target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    """Print the fitted values (and a short report) for a measurement folder as YAML."""
    import yaml

    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else None
    fitted = fit_h100(path)
    r = fit_report(path)
    print(yaml.safe_dump({"fitted": fitted}, sort_keys=False, default_flow_style=None), end="")
    chk = r["check_expert_sized_h2d"]
    print(
        f"# expert-sized H2D copy: predicted {chk['predicted_ms']:.3f} ms, measured median "
        f"{chk['measured_ms']:.3f} ms; bidirectional derate H2D {r['bidirectional']['h2d']:.3f} "
        f"D2H {r['bidirectional']['d2h']:.3f}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
