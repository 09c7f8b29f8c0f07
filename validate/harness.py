"""Shared pieces of the measurement harnesses (:mod:`validate.measure`, :mod:`validate.e2e`):
a device backend (CUDA, or a CPU stand-in), timing statistics, machine facts and atomic JSON files.

Only the standard library, numpy and torch are imported here (torch lazily), so the harness runs on
a GPU machine that has torch but not moesim's other dependencies (pydantic, simpy, plotly).

The backend gives the harness one vocabulary for both devices:

* :class:`CudaBackend`: CUDA events (GPU time), streams, CUDA graphs, pinned host memory and a spin
  kernel (``torch.cuda._sleep``) that holds the GPU busy so that later work queues up behind it;
* :class:`CpuBackend`: the same calls on the CPU, where every operation is synchronous: an "event"
  reads ``time.perf_counter`` when it is recorded, streams are no-ops, a "graph" is the plain
  function, "pinned" memory is ordinary memory and the spin is a busy wait. It lets the CPU run the
  code paths of the CUDA measurements (tests do, with ``emulate_cuda=True``); the numbers are then
  host timings of CPU copies and kernels, not GPU figures, and the output says so
  (``_meta.emulated``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SMI_QUERY_FIELDS = (
    "name,driver_version,memory.total,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,"
    "pcie.link.width.max,clocks.current.sm,clocks.current.memory,clocks.max.sm,clocks.max.memory,"
    "power.limit,temperature.gpu"
)
SMI_STATE_FIELDS = (
    "clocks.sm,clocks.mem,temperature.gpu,power.draw,pcie.link.gen.current,pcie.link.width.current,"
    "clocks_throttle_reasons.active"
)
CPU_FLAGS_OF_INTEREST = (
    "amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512_bf16", "avx512_bitalg", "avx512_fp16",
    "avx512_vbmi2", "avx512_vnni", "avx512_vpopcntdq", "avx512bw", "avx512cd", "avx512dq", "avx512f",
    "avx512ifma", "avx512vbmi", "avx512vl", "fma",
)


# ----- statistics ------------------------------------------------------------------------------
def stats(values) -> dict:
    """``{median, mean, min, max, p10, p90, n}`` of ``values`` (the external data set's layout)."""
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        raise ValueError("no samples")
    return {
        "median": float(np.median(a)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
        "p10": float(np.percentile(a, 10)),
        "p90": float(np.percentile(a, 90)),
        "n": int(a.size),
    }


# ----- files -----------------------------------------------------------------------------------
def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` (folders made as needed) through a temporary file in the same
    folder and a rename, so a reader never sees a half-written file. Mode 0644: ``mkstemp`` makes
    0600, and these are ordinary shared files (measurements, reports, profiles)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` through a temporary file and a rename."""
    return write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----- machine facts ---------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float = 20.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def smi_query() -> str | None:
    """``nvidia-smi --query-gpu=... --format=csv`` (header line + one line per GPU), or None."""
    out = _run(["nvidia-smi", f"--query-gpu={SMI_QUERY_FIELDS}", "--format=csv"])
    return out.strip() if out else None


def gpu_state() -> str | None:
    """Clocks, temperature, power, PCIe link and throttle reasons of GPU 0 right now, or None."""
    out = _run(["nvidia-smi", f"--query-gpu={SMI_STATE_FIELDS}", "--format=csv,noheader"])
    return out.strip().splitlines()[0] if out else None


def pcie_link(query: str | None) -> dict | None:
    """PCIe generation and width (current and max) parsed from :func:`smi_query`'s text."""
    if not query:
        return None
    lines = query.splitlines()
    if len(lines) < 2:
        return None
    row = dict(zip([s.strip() for s in lines[0].split(",")], [s.strip() for s in lines[1].split(",")]))
    out = {}
    for k in ("pcie.link.gen.current", "pcie.link.gen.max", "pcie.link.width.current", "pcie.link.width.max"):
        try:
            out[k] = int(row[k])
        except (KeyError, ValueError):
            out[k] = None
    return out


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def cpu_model() -> str:
    """The first ``model name`` line of /proc/cpuinfo (or platform.processor())."""
    info = _read("/proc/cpuinfo") or ""
    for line in info.splitlines():
        if line.startswith("model name"):
            return line
    return "model name\t: " + (platform.processor() or platform.machine())


def cpu_flags() -> list[str]:
    """The CPU flags of :data:`CPU_FLAGS_OF_INTEREST` the host has."""
    info = _read("/proc/cpuinfo") or ""
    for line in info.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in CPU_FLAGS_OF_INTEREST if f in have]
    return []


def machine_facts(torch) -> dict:
    """Software and host facts recorded with every measurement (the external ``env.json`` keys)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    query = smi_query()
    facts = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
        "os_cpu_count": os.cpu_count(),
        "sched_affinity": affinity,
        "torch_num_threads_default": torch.get_num_threads(),
        "torch_parallel_info": torch.__config__.parallel_info(),
        "cpu_model": cpu_model(),
        "cpu_cores": affinity,
        "cpu_flags_of_interest": cpu_flags(),
        "lscpu": _run(["lscpu"]) or "",
        "meminfo": _read("/proc/meminfo") or "",
        "nvidia_smi": _run(["nvidia-smi"]),
        "nvidia_smi_query": query,
        "nvidia_smi_topo": _run(["nvidia-smi", "topo", "-m"]),
        "pcie_link": pcie_link(query),
    }
    try:
        import transformers  # noqa: F401 - recorded when present

        facts["transformers"] = transformers.__version__
    except ImportError:
        facts["transformers"] = None
    return facts


# ----- backends --------------------------------------------------------------------------------
class CudaBackend:
    """CUDA events, streams, graphs, pinned memory and a spin kernel on ``cuda:0``."""

    is_cuda = True
    emulated = False
    name = "cuda"

    def __init__(self, torch):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available to torch on this machine")
        self.torch = torch
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._cycles_per_ms = None

    def props(self) -> dict:
        p = self.torch.cuda.get_device_properties(self.device)
        return {
            "name": p.name,
            "multi_processor_count": p.multi_processor_count,
            "total_memory": p.total_memory,
            "major": p.major,
            "minor": p.minor,
            "L2_cache_size": getattr(p, "L2_cache_size", None),
        }

    def l2_bytes(self) -> int:
        return int(self.props().get("L2_cache_size") or 64 * 2**20)

    def event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def stream(self):
        return self.torch.cuda.Stream(device=self.device)

    def current_stream(self):
        return self.torch.cuda.current_stream(self.device)

    def use(self, stream):
        return self.torch.cuda.stream(stream)

    def synchronize(self):
        self.torch.cuda.synchronize(self.device)

    def empty_host(self, nbytes: int, pinned: bool, dtype=None):
        t = self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=pinned)
        return t if dtype is None else t.view(dtype)

    def graph(self, fn, warmup: int = 2):
        """Capture ``fn`` in a CUDA graph; returns the replay function."""
        torch = self.torch
        s = torch.cuda.Stream(device=self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay

    def spin(self, ms: float) -> None:
        """Enqueue a kernel that keeps the GPU busy for about ``ms`` milliseconds."""
        if self._cycles_per_ms is None:
            self._calibrate_spin()
        self.torch.cuda._sleep(int(self._cycles_per_ms * ms))

    def _calibrate_spin(self) -> None:
        torch = self.torch
        cycles = 2_000_000
        torch.cuda._sleep(cycles)  # warm-up
        a, b = self.event(), self.event()
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        b.synchronize()
        self._cycles_per_ms = cycles / max(a.elapsed_time(b), 1e-3)


class _CpuEvent:
    """An "event" of the CPU backend: the host clock when it was recorded."""

    __slots__ = ("t",)

    def __init__(self):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: "_CpuEvent") -> float:
        return (other.t - self.t) * 1e3


class _CpuStream:
    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        event = event or _CpuEvent()
        event.record()
        return event


class CpuBackend:
    """The CPU stand-in for :class:`CudaBackend` (see the module docstring)."""

    is_cuda = False
    name = "cpu"

    def __init__(self, torch, emulated: bool = False):
        self.torch = torch
        self.device = torch.device("cpu")
        self.emulated = emulated
        self._stream = _CpuStream()

    def props(self) -> dict:
        return {"name": "cpu (" + cpu_model().split(":", 1)[-1].strip() + ")", "multi_processor_count": None,
                "total_memory": None, "major": None, "minor": None, "L2_cache_size": None}

    def l2_bytes(self) -> int:
        return 2 * 2**20

    def event(self):
        return _CpuEvent()

    def stream(self):
        return _CpuStream()

    def current_stream(self):
        return self._stream

    def use(self, stream):
        return contextlib.nullcontext()

    def synchronize(self):
        pass

    def empty_host(self, nbytes: int, pinned: bool, dtype=None):
        t = self.torch.empty(nbytes, dtype=self.torch.uint8)
        return t if dtype is None else t.view(dtype)

    def graph(self, fn, warmup: int = 2):
        for _ in range(warmup):
            fn()
        return fn

    def spin(self, ms: float) -> None:
        """Nothing: the CPU runs every operation in order when it is issued, so there is no queue
        for a spin to hold back."""


def make_backend(device: str, *, emulate_cuda: bool = False):
    """The backend for ``device`` ("cuda" or "cpu"); ``emulate_cuda`` runs the CUDA code paths on
    the CPU stand-in (tests)."""
    import torch

    if device == "cuda":
        return CudaBackend(torch)
    if device == "cpu":
        return CpuBackend(torch, emulated=emulate_cuda)
    raise ValueError(f"unknown device {device!r} (cuda or cpu)")


def elapsed_ms(a, b) -> float:
    """Milliseconds from event ``a`` to event ``b`` (both already complete)."""
    return float(a.elapsed_time(b))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def nrot_for(nbytes: int, target: int) -> int:
    """Copies of a ``nbytes`` buffer to cycle through so that together they exceed ``target``."""
    return max(1, math.ceil(target / max(1, nbytes)))
