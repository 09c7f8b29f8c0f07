"""Component measurements of one GPU machine (``moesim validate measure``).

Writes a measurement folder in the layout of ``validate/measurements/external/h100-sxm/`` (same
files, keys and units; see that folder's README), so that :mod:`moesim.hardware.fit` and
``moesim validate compare --measurements DIR`` read it unchanged:

=================  ===========================================================================
part               what, and where it goes
=================  ===========================================================================
(always)           ``env.json``: machine facts (GPU name, driver, CUDA and torch versions, PCIe
                   link generation/width from nvidia-smi, CPU model and flags, cores, memory),
                   on CUDA also a device-to-device copy and a large bf16 GEMM (TFLOP/s)
``launch``         ``env.json`` ``host_overheads``: host enqueue time per kernel (a tiny
                   element-wise kernel and a 1 x h x h GEMM) while the GPU is busy and their GPU
                   time back to back, one CUDA-graph replay and one 4 KiB copy issue likewise, an
                   event record + synchronize, a 16-byte device-to-host read-back + synchronize
``copies``         ``link.json`` ``transfers`` (H2D and D2H, pinned and pageable, 4 KiB ... 1 GiB;
                   event and wall time), ``bidirectional_pinned`` (both directions at once),
                   ``expert_sized_h2d_series`` (back-to-back copies of one Mixtral expert from
                   torch-pinned and from cudaHostRegister'ed mmap memory)
``interference``   ``link.json`` ``concurrent_copy_and_kernel``: a large copy against a chain of
                   compute-bound GEMMs or memory-bound 1-token Mixtral experts, alone and together
``expert``         ``expert_gpu.json``: one SwiGLU expert per shape and token count (1 ... 4096),
                   as a replayed CUDA graph (pure GPU time), eagerly back to back (with launch
                   gaps) and one call + synchronize from idle
``cpu``            ``expert_cpu.json``: the same expert on the host CPU with torch, fp32 and bf16,
                   tokens 1 ... 32 with all threads (``rows``), and a thread sweep
                   (``rows_by_threads``, an addition to the external layout)
``attention``      ``attention.json`` (not in the external layout): the dense part of one decode
                   block (RMSNorm, Q/K/V projections, attention over a KV cache of ``context``
                   tokens, output projection, residual, RMSNorm, router and top-k) by batch and
                   context, as a replayed CUDA graph and eagerly; runs on the CPU too (then with
                   host timings, fp32, and ``graph`` = the plain call)
=================  ===========================================================================

Every timing is a list of repetitions after warm-up, summarised as median, mean, min, max, p10, p90
and n. Inputs defeat the L2 cache: weights and activations rotate through enough copies to exceed
it (expert), copies rotate their source and destination through buffers of several L2 sizes.

Without CUDA (``--device cpu``) the CUDA-only parts (``expert``, ``copies``, ``interference``,
``launch``, the GEMM and device copy of ``env``) are skipped: ``env.json`` lists them under
``skipped_parts`` with the reason and the command prints one line each. ``quick=True`` shrinks
sizes and repetitions so that the whole harness runs in seconds (``_meta.smoke`` is then true:
such numbers are for testing the harness, not for fitting). ``emulate_cuda=True`` (tests only)
runs the CUDA code paths on the CPU stand-in of :mod:`validate.harness`; its files carry
``_meta.emulated: true``.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from validate.harness import (
    gpu_state,
    machine_facts,
    make_backend,
    nrot_for,
    stats,
    write_json_atomic,
)

PARTS = ("expert", "copies", "launch", "cpu", "interference", "attention")
CUDA_PARTS = ("expert", "copies", "launch", "interference")
HARNESS = "moesim validate measure (validate/measure.py)"
KIB, MIB, GIB = 2**10, 2**20, 2**30

#: SwiGLU expert shapes (hidden h, expert width f), as in the external data set
GPU_SHAPES = {"mixtral": (4096, 14336), "qwen-moe": (2048, 1408), "olmoe": (2048, 1024), "deepseek-v3": (7168, 2048)}
CPU_SHAPES = {"mixtral": (4096, 14336), "qwen-moe": (2048, 1408)}
QUICK_SHAPES = {"tiny": (256, 512)}
QUICK_CPU_SHAPES = {"tiny": (64, 128)}
MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2  # 352,321,536: one Mixtral-8x7B expert in bf16
#: dense-block shapes of the attention part: hidden, query heads, KV heads, head dim, routed experts
#: (public model configs; DeepSeek-V3's MLA attention is not this op and is left out)
ATTN_SHAPES = {"mixtral": (4096, 32, 8, 128, 8), "qwen-moe": (2048, 16, 16, 128, 60), "olmoe": (2048, 16, 16, 128, 64)}
QUICK_ATTN_SHAPES = {"tiny": (64, 4, 2, 16, 8)}


@dataclass
class Sizes:
    """Sizes and repetition counts of one run (full, or ``quick``)."""

    quick: bool
    gpu_shapes: dict
    gpu_tokens: list
    graph_reps: int
    eager_reps: int
    sync_reps: int
    gpu_rotation_bytes: int
    transfer_sizes: list
    bidir_bytes: int
    bidir_reps: int
    series_bytes: int
    series_reps: int
    interference_copy_bytes: int
    interference_gemm_n: int
    interference_expert: tuple
    interference_reps: int
    launches: int
    launch_reps: int
    idle_reps: int
    launch_mm_h: int
    d2d_bytes: int
    gemm_n: int
    env_reps: int
    cpu_shapes: dict
    cpu_tokens: list
    cpu_dtypes: tuple = ("float32", "bfloat16")
    cpu_rotation_bytes: int = 512 * MIB
    cpu_budget_s: float = 2.0
    cpu_reps: tuple = (5, 30)
    thread_tokens: list = field(default_factory=lambda: [1, 16])
    thread_shapes: tuple = ("mixtral",)
    thread_budget_s: float = 1.0
    thread_reps: tuple = (3, 15)
    attn_shapes: dict = field(default_factory=lambda: dict(ATTN_SHAPES))
    attn_batches: list = field(default_factory=lambda: [1, 8, 32])
    attn_contexts: list = field(default_factory=lambda: [256, 2048, 8192])
    attn_graph_reps: int = 50
    attn_eager_reps: int = 100
    attn_max_rot: int = 128

    def transfer_reps(self, nbytes: int) -> int:
        if self.quick:
            return 5
        return 50 if nbytes <= MIB else 20 if nbytes <= 64 * MIB else 10


def sizes(quick: bool) -> Sizes:
    """The full measurement plan, or the ``quick`` one (seconds on a CPU; harness tests only)."""
    if quick:
        return Sizes(
            quick=True, gpu_shapes=QUICK_SHAPES, gpu_tokens=[1, 4, 16], graph_reps=5, eager_reps=10,
            sync_reps=5, gpu_rotation_bytes=4 * MIB, transfer_sizes=[4 * KIB, 64 * KIB, MIB],
            bidir_bytes=MIB, bidir_reps=3, series_bytes=MIB, series_reps=5, interference_copy_bytes=4 * MIB,
            interference_gemm_n=256, interference_expert=(256, 512), interference_reps=3, launches=50,
            launch_reps=3, idle_reps=20, launch_mm_h=256, d2d_bytes=4 * MIB, gemm_n=256, env_reps=3,
            cpu_shapes=QUICK_CPU_SHAPES, cpu_tokens=[1, 4], cpu_rotation_bytes=MIB, cpu_budget_s=0.05,
            cpu_reps=(3, 5), thread_tokens=[1, 4], thread_shapes=("tiny",), thread_budget_s=0.05,
            thread_reps=(3, 3), attn_shapes=dict(QUICK_ATTN_SHAPES), attn_batches=[1, 4], attn_contexts=[16, 64],
            attn_graph_reps=5, attn_eager_reps=5, attn_max_rot=4,
        )
    return Sizes(
        quick=False, gpu_shapes=GPU_SHAPES, gpu_tokens=[2**i for i in range(13)], graph_reps=100,
        eager_reps=200, sync_reps=50, gpu_rotation_bytes=256 * MIB,
        transfer_sizes=[4 * KIB, 64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB, GIB],
        bidir_bytes=256 * MIB, bidir_reps=10, series_bytes=MIXTRAL_EXPERT_BYTES, series_reps=100,
        interference_copy_bytes=GIB, interference_gemm_n=8192, interference_expert=GPU_SHAPES["mixtral"],
        interference_reps=10, launches=500, launch_reps=3, idle_reps=200, launch_mm_h=4096, d2d_bytes=GIB,
        gemm_n=8192, env_reps=10, cpu_shapes=CPU_SHAPES, cpu_tokens=[1, 2, 4, 8, 16, 32],
    )


# ----- helpers ---------------------------------------------------------------------------------
def _meta(part: str, sz: Sizes, bk, t0: float, torch, parts_run: list) -> dict:
    return {
        "part": part,
        "parts": parts_run,
        "smoke": sz.quick,
        "seconds": time.perf_counter() - t0,
        "ok": True,
        "torch": torch.__version__,
        "device": bk.name,
        "emulated": bool(getattr(bk, "emulated", False)),
        "harness": HARNESS,
    }


def swiglu(torch, x, w1, w3, w2):
    """The measured expert: ``(silu(x @ W1) * (x @ W3)) @ W2`` (5 kernels eagerly)."""
    F = torch.nn.functional
    return torch.mm(F.silu(torch.mm(x, w1)) * torch.mm(x, w3), w2)


def _event_ms(bk, fn, reps: int, warmup: int = 2) -> list:
    """GPU time of ``fn`` per call (events around each call, a synchronize after each)."""
    for _ in range(warmup):
        fn()
    bk.synchronize()
    out = []
    for _ in range(reps):
        a, b = bk.event(), bk.event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def _gen_weights(torch, bk, h: int, f: int, dtype, n: int, device):
    """``n`` weight sets (W1, W3: [h, f]; W2: [f, h]) from torch.randn, scaled 1/sqrt(h), 1/sqrt(f);
    made on the GPU when there is one (fast), then moved to ``device``."""
    gen_dev = bk.device if bk.is_cuda else torch.device("cpu")
    sets = []
    for _ in range(n):
        w1 = (torch.randn(h, f, device=gen_dev) / math.sqrt(h)).to(dtype).to(device)
        w3 = (torch.randn(h, f, device=gen_dev) / math.sqrt(h)).to(dtype).to(device)
        w2 = (torch.randn(f, h, device=gen_dev) / math.sqrt(f)).to(dtype).to(device)
        sets.append((w1, w3, w2))
    return sets


# ----- env: device facts, device copy, GEMM -----------------------------------------------------
def measure_env_device(torch, bk, sz: Sizes) -> dict:
    """Device properties, a device-to-device copy (read + write GB/s) and a bf16 GEMM (TFLOP/s)."""
    out = {"device": bk.props()}
    dev = bk.device
    n = sz.d2d_bytes
    src = torch.empty(n, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    ms = stats(_event_ms(bk, lambda: dst.copy_(src), sz.env_reps, warmup=3))
    out["d2d_copy"] = {"bytes": n, "ms": ms, "GBps_read_plus_write": 2 * n / (ms["median"] * 1e-3) / 1e9}
    g = sz.gemm_n
    dt = torch.bfloat16
    a = torch.randn(g, g, device=dev).to(dt)
    b = torch.randn(g, g, device=dev).to(dt)
    ms = stats(_event_ms(bk, lambda: torch.mm(a, b), sz.env_reps, warmup=3))
    out["gemm_bf16"] = {"m=n=k": g, "ms": ms, "TFLOPs": 2 * g**3 / (ms["median"] * 1e-3) / 1e12}
    return out


# ----- launch: host overheads ---------------------------------------------------------------------
def _enqueue_cost(bk, fn, launches: int, reps: int) -> dict:
    """Host time per enqueue of ``fn`` while the GPU is busy (a spin kernel runs first, so the
    queue never drains), and the GPU time per call of the enqueued calls back to back."""
    host, gpu = [], []
    fn()
    bk.synchronize()
    spin_ms = max(20.0, launches * 0.05)
    for _ in range(reps):
        bk.synchronize()
        bk.spin(spin_ms)
        e0, e1 = bk.event(), bk.event()
        e0.record()
        t0 = time.perf_counter()
        for _ in range(launches):
            fn()
        t1 = time.perf_counter()
        e1.record()
        e1.synchronize()
        host.append((t1 - t0) / launches * 1e6)
        gpu.append(e0.elapsed_time(e1) * 1e3 / launches)
    return {"host_enqueue_us_per_launch": stats(host), "gpu_us_per_kernel_back_to_back": stats(gpu),
            "launches_per_rep": launches}


def measure_launch(torch, bk, sz: Sizes) -> dict:
    """``env.json`` ``host_overheads`` (what :func:`moesim.hardware.fit.fit_host_costs` reads, plus
    a graph replay and a copy issue, which the fit still assumes)."""
    dev = bk.device
    x = torch.zeros(1024, device=dev)
    h = sz.launch_mm_h
    a = torch.randn(1, h, device=dev).to(torch.bfloat16)
    w = torch.randn(h, h, device=dev).to(torch.bfloat16)
    ho = {
        "tiny_add_": _enqueue_cost(bk, lambda: x.add_(1.0), sz.launches, sz.launch_reps),
        f"mm_1x{h}x{h}_bf16": _enqueue_cost(bk, lambda: torch.mm(a, w), sz.launches, sz.launch_reps),
    }
    y = torch.zeros(1024, device=dev)
    replay = bk.graph(lambda: y.add_(1.0))
    ho["graph_replay_1_kernel"] = _enqueue_cost(bk, replay, sz.launches, sz.launch_reps)
    src = bk.empty_host(4 * KIB, pinned=True)
    dst = torch.empty(4 * KIB, dtype=torch.uint8, device=dev)
    ho["h2d_copy_4KiB_pinned_issue"] = _enqueue_cost(
        bk, lambda: dst.copy_(src, non_blocking=True), sz.launches, sz.launch_reps)
    ev = []
    for _ in range(sz.idle_reps):
        bk.synchronize()
        e = bk.event()
        t0 = time.perf_counter()
        e.record()
        e.synchronize()
        ev.append((time.perf_counter() - t0) * 1e6)
    ho["event_record_and_synchronize_idle_us"] = stats(ev)
    small = torch.zeros(4, dtype=torch.float32, device=dev)
    host16 = bk.empty_host(16, pinned=True, dtype=torch.float32)
    cur = bk.current_stream()
    rb = []
    for _ in range(sz.idle_reps):
        bk.synchronize()
        t0 = time.perf_counter()
        host16.copy_(small, non_blocking=True)
        cur.synchronize()
        rb.append((time.perf_counter() - t0) * 1e6)
    ho["small_d2h_pinned_plus_sync_idle_us"] = stats(rb)
    ho["method"] = (
        "host_enqueue_us_per_launch: host clock around `launches` back-to-back enqueues while a spin kernel "
        "keeps the GPU busy (the launch queue never drains), per launch; gpu_us_per_kernel_back_to_back: "
        "events around the same calls, which then run back to back; graph_replay_1_kernel: CUDAGraph.replay() "
        "of a one-kernel graph; h2d_copy_4KiB_pinned_issue: a non_blocking 4 KiB pinned H2D copy_; idle rows: "
        "host clock of one operation + synchronize from an idle GPU"
    )
    return ho


# ----- copies --------------------------------------------------------------------------------------
class _Rot:
    """Rotating slices of one buffer: consecutive calls return different ``size``-byte windows, so
    that small copies do not keep hitting the same cache lines."""

    def __init__(self, buf, size: int):
        self.buf = buf
        self.size = size
        self.slots = max(1, buf.numel() // size)
        self.i = 0

    def next(self):
        k = self.i % self.slots
        self.i += 1
        return self.buf[k * self.size:(k + 1) * self.size]


def measure_copies(torch, bk, sz: Sizes) -> dict:
    """``link.json``: transfers by size, both directions at once, expert-sized series."""
    dev = bk.device
    maxb = max(sz.transfer_sizes + [sz.series_bytes, 2 * sz.bidir_bytes])
    l2 = bk.l2_bytes()
    t0 = time.perf_counter()
    pinned = bk.empty_host(max(maxb, 4 * l2), pinned=True)
    pinned_alloc_s = time.perf_counter() - t0
    pinned.fill_(1)
    pageable = torch.empty(max(maxb, 4 * l2), dtype=torch.uint8)
    pageable.fill_(1)  # touch every page
    dbuf = torch.empty(max(maxb, 4 * l2), dtype=torch.uint8, device=dev)
    s = bk.stream()
    transfers = []
    for mode in ("pinned", "pageable"):
        host = pinned if mode == "pinned" else pageable
        for direction in ("H2D", "D2H"):
            for n in sz.transfer_sizes:
                hr, dr = _Rot(host, n), _Rot(dbuf, n)
                reps = sz.transfer_reps(n)
                ev_ms, wall_ms = [], []
                for i in range(3 + reps):
                    h, d = hr.next(), dr.next()
                    src, dst = (h, d) if direction == "H2D" else (d, h)
                    bk.synchronize()
                    a, b = bk.event(), bk.event()
                    w0 = time.perf_counter()
                    with bk.use(s):
                        a.record(s)
                        dst.copy_(src, non_blocking=(mode == "pinned"))
                        b.record(s)
                    b.synchronize()
                    w1 = time.perf_counter()
                    if i >= 3:
                        ev_ms.append(a.elapsed_time(b))
                        wall_ms.append((w1 - w0) * 1e3)
                ev, wl = stats(ev_ms), stats(wall_ms)
                transfers.append({
                    "mode": mode, "direction": direction, "bytes": n, "event_ms": ev, "wall_ms": wl,
                    "GBps_event_median": n / (ev["median"] * 1e-3) / 1e9,
                    "GBps_wall_median": n / (wl["median"] * 1e-3) / 1e9,
                })
    out = {
        "method": (
            "torch Tensor.copy_ between a host tensor and a device tensor on a non-default stream; pinned host "
            "memory = torch.empty(pin_memory=True) and copy_(non_blocking=True); pageable = plain torch.empty on "
            "the host (pages touched first) and copy_(non_blocking=False). Source and destination rotate through "
            "windows of buffers of at least 4x the L2 size. Per rep: synchronize; host clock t0; event e0; copy; "
            "event e1; e1.synchronize(); host clock t1. 'event_ms' = e0->e1 on the GPU, 'wall_ms' = t1-t0 on the "
            f"host. 3 warm-up reps, then R reps ({'5' if sz.quick else '50 for <=1 MiB, 20 for <=64 MiB, else 10'}). "
            "GB/s = bytes/median/1e9."
        ),
        "gpu_state_start": gpu_state(),
        "pinned_alloc_s_for_max_size": pinned_alloc_s,
        "transfers": transfers,
        "bidirectional_pinned": _bidirectional(torch, bk, sz, pinned, dbuf),
        "expert_sized_h2d_series": _series(torch, bk, sz, pinned, dbuf),
    }
    return out


def _bidirectional(torch, bk, sz: Sizes, pinned, dbuf) -> dict:
    n = sz.bidir_bytes
    src_h, dst_h = pinned[:n], pinned[n:2 * n]
    dst_d, src_d = dbuf[:n], dbuf[n:2 * n]
    s1, s2 = bk.stream(), bk.stream()
    cur = bk.current_stream()
    h2d, d2h, span = [], [], []
    for i in range(2 + sz.bidir_reps):
        bk.synchronize()
        bk.spin(10.0)
        g = bk.event()
        g.record(cur)
        s1.wait_event(g)
        s2.wait_event(g)
        a1, b1, a2, b2 = bk.event(), bk.event(), bk.event(), bk.event()
        with bk.use(s1):
            a1.record(s1)
            dst_d.copy_(src_h, non_blocking=True)
            b1.record(s1)
        with bk.use(s2):
            a2.record(s2)
            dst_h.copy_(src_d, non_blocking=True)
            b2.record(s2)
        bk.synchronize()
        if i >= 2:
            h2d.append(a1.elapsed_time(b1))
            d2h.append(a2.elapsed_time(b2))
            span.append(max(g.elapsed_time(b1), g.elapsed_time(b2)))
    hs, ds, sp = stats(h2d), stats(d2h), stats(span)
    return {
        "bytes_each_direction": n,
        "method": (
            "a 10 ms spin kernel on the default stream gates both streams (each waits on its end event), then H2D "
            "(pinned -> device) on one stream and D2H (device -> another pinned buffer) on the other; per-copy "
            "event times and the span from the gate"
        ),
        "h2d_ms": hs, "d2h_ms": ds, "span_ms": sp,
        "GBps_h2d": n / (hs["median"] * 1e-3) / 1e9,
        "GBps_d2h": n / (ds["median"] * 1e-3) / 1e9,
        "GBps_aggregate_over_span": 2 * n / (sp["median"] * 1e-3) / 1e9,
    }


def _series_times(bk, src, dst, reps: int) -> dict:
    s = bk.stream()
    dst.copy_(src, non_blocking=True)  # warm-up
    bk.synchronize()
    evs = [bk.event() for _ in range(reps + 1)]
    with bk.use(s):
        evs[0].record(s)
        for i in range(reps):
            dst.copy_(src, non_blocking=True)
            evs[i + 1].record(s)
    bk.synchronize()
    all_ms = [evs[i].elapsed_time(evs[i + 1]) for i in range(reps)]
    st = stats(all_ms)
    return {"ms": st, "all_ms": all_ms, "GBps_median": src.numel() / (st["median"] * 1e-3) / 1e9}


def _series(torch, bk, sz: Sizes, pinned, dbuf) -> dict:
    n = sz.series_bytes
    out = {
        "bytes": n,
        "reps": sz.series_reps,
        "method": (
            "one stream, nrep H2D copies enqueued back to back with an event between consecutive copies (no host "
            "sync in between); per-copy time = gap between events"
        ),
        "torch_pinned": _series_times(bk, pinned[:n], dbuf[:n], sz.series_reps),
    }
    if not bk.is_cuda:
        out["mmap_cudaHostRegister_skipped"] = "cudaHostRegister needs CUDA"
        return out
    import mmap

    mm = None
    try:
        mm = mmap.mmap(-1, n)
        host = torch.frombuffer(mm, dtype=torch.uint8)
        host.fill_(1)
        rt = torch.cuda.cudart()
        rc = rt.cudaHostRegister(host.data_ptr(), n, 0)
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister returned {int(rc)}")
        try:
            out["mmap_cudaHostRegister"] = _series_times(bk, host, dbuf[:n], sz.series_reps)
        finally:
            bk.synchronize()
            rt.cudaHostUnregister(host.data_ptr())
        del host
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        out["mmap_cudaHostRegister_skipped"] = f"{type(exc).__name__}: {exc}"
    finally:
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass
    return out


# ----- interference ----------------------------------------------------------------------------------
def measure_interference(torch, bk, sz: Sizes) -> dict:
    """``link.json`` ``concurrent_copy_and_kernel``: a copy against a chain of kernels."""
    dev = bk.device
    n = sz.interference_copy_bytes
    host = bk.empty_host(n, pinned=True)
    host.fill_(1)
    dbuf = torch.empty(n, dtype=torch.uint8, device=dev)
    g = sz.interference_gemm_n
    A = torch.randn(g, g, device=dev).to(torch.bfloat16)
    B = torch.randn(g, g, device=dev).to(torch.bfloat16)
    h, f = sz.interference_expert
    l2 = bk.l2_bytes()
    wsets = _gen_weights(torch, bk, h, f, torch.bfloat16, nrot_for(3 * h * f * 2, 2 * l2) if sz.quick else 1, dev)
    x1 = torch.randn(1, h, device=dev).to(torch.bfloat16)
    rot = {"i": 0}

    def expert():
        w = wsets[rot["i"] % len(wsets)]
        rot["i"] += 1
        swiglu(torch, x1, *w)

    kernels = [(f"gemm_bf16_{g}", lambda: torch.mm(A, B), {"m=n=k": g}),
               ("mixtral_expert_1token", expert, {"h": h, "f": f, "tokens": 1})]
    cs, ks = bk.stream(), bk.stream()
    cur = bk.current_stream()
    cases = []
    for name, fn, shape in kernels:
        one = stats(_event_ms(bk, fn, 10 if not sz.quick else 3, warmup=3))["median"]
        for direction in ("H2D", "D2H"):
            src, dst = (host, dbuf) if direction == "H2D" else (dbuf, host)
            copy_alone_est = stats(_event_ms(bk, lambda: dst.copy_(src, non_blocking=True), 2, warmup=1))["median"]
            N = max(1, round(copy_alone_est / max(one, 1e-6)))
            res = {"copy_alone": [], "kernels_alone": [], "copy_conc": [], "kernels_conc": [], "span": []}
            for rep in range(1 + sz.interference_reps):
                for mode in ("copy", "kernels", "both"):
                    bk.synchronize()
                    bk.spin(30.0)
                    gate = bk.event()
                    gate.record(cur)
                    c0 = c1 = k0 = k1 = None
                    if mode in ("copy", "both"):
                        cs.wait_event(gate)
                        c0, c1 = bk.event(), bk.event()
                        with bk.use(cs):
                            c0.record(cs)
                            dst.copy_(src, non_blocking=True)
                            c1.record(cs)
                    if mode in ("kernels", "both"):
                        ks.wait_event(gate)
                        k0, k1 = bk.event(), bk.event()
                        with bk.use(ks):
                            k0.record(ks)
                            for _ in range(N):
                                fn()
                            k1.record(ks)
                    bk.synchronize()
                    if rep == 0:
                        continue  # warm-up round
                    if mode == "copy":
                        res["copy_alone"].append(c0.elapsed_time(c1))
                    elif mode == "kernels":
                        res["kernels_alone"].append(k0.elapsed_time(k1))
                    else:
                        res["copy_conc"].append(c0.elapsed_time(c1))
                        res["kernels_conc"].append(k0.elapsed_time(k1))
                        res["span"].append(max(gate.elapsed_time(c1), gate.elapsed_time(k1)))
            ca, ka, cc, kc, sp = (stats(res[k]) for k in ("copy_alone", "kernels_alone", "copy_conc",
                                                           "kernels_conc", "span"))
            cases.append({
                "kernel": name, "direction": direction, "N_kernels": N, "one_kernel_ms": one, "shape": shape,
                "copy_alone_ms": ca, "kernels_alone_ms": ka, "copy_concurrent_ms": cc,
                "kernels_concurrent_ms": kc, "span_concurrent_ms_from_gate": sp,
                "copy_slowdown": cc["median"] / ca["median"], "kernel_slowdown": kc["median"] / ka["median"],
                "copy_GBps_alone": n / (ca["median"] * 1e-3) / 1e9,
                "copy_GBps_concurrent": n / (cc["median"] * 1e-3) / 1e9,
            })
    return {
        "copy_bytes": n,
        "method": (
            "copy on one stream and a chain of N identical kernels on another, both gated by a 30 ms spin kernel "
            "(both streams wait on its end event) so they start together; the 'alone' runs are gated the same way "
            "and interleaved with the concurrent runs rep by rep (a first round is warm-up); N chosen so the chain "
            "alone lasts about as long as the copy alone; times are event times on each stream; medians of R reps; "
            "slowdown = concurrent/alone"
        ),
        "cases": cases,
    }


# ----- GPU expert ----------------------------------------------------------------------------------------
def graph_and_eager_us(bk, call, many, G: int, graph_warm: int, graph_reps: int, eager_reps: int):
    """Per-call times (µs) of one op, two ways: ``many`` (G calls) captured as a graph and replayed
    ``graph_warm`` untimed then ``graph_reps`` timed times (each replay's time / G); then, after three
    untimed ``call()``, ``eager_reps`` calls enqueued back to back with events around each."""
    replay = bk.graph(many)
    graph = []
    for i in range(graph_warm + graph_reps):
        a, b = bk.event(), bk.event()
        a.record()
        replay()
        b.record()
        b.synchronize()
        if i >= graph_warm:
            graph.append(a.elapsed_time(b) * 1e3 / G)
    del replay
    for _ in range(3):
        call()
    bk.synchronize()
    evs = [(bk.event(), bk.event()) for _ in range(eager_reps)]
    for a, b in evs:
        a.record()
        call()
        b.record()
    bk.synchronize()
    return graph, [a.elapsed_time(b) * 1e3 for a, b in evs]


def measure_expert_gpu(torch, bk, sz: Sizes) -> dict:
    """``expert_gpu.json``: graph, eager and sync-wall time per call by shape and token count."""
    dev = bk.device
    dt = torch.bfloat16
    l2 = bk.l2_bytes()
    rows = []
    state_start = gpu_state()
    for shape, (h, f) in sz.gpu_shapes.items():
        wbytes = 3 * h * f * 2
        nrot = nrot_for(wbytes, sz.gpu_rotation_bytes)
        W = _gen_weights(torch, bk, h, f, dt, nrot, dev)
        for n in sz.gpu_tokens:
            X = [torch.randn(n, h, device=dev).to(dt) for _ in range(nrot)]
            rot = {"i": 0}

            def call():
                i = rot["i"] % nrot
                rot["i"] += 1
                return swiglu(torch, X[i], *W[i])

            rel_err = None
            if n <= 64:
                out = swiglu(torch, X[0], *W[0]).float()
                ref = swiglu(torch, X[0].float(), *(w.float() for w in W[0]))
                rel_err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
            G = max(nrot, 4)

            def many():
                for j in range(G):
                    swiglu(torch, X[j % nrot], *W[j % nrot])

            graph, eager = graph_and_eager_us(bk, call, many, G, 3, sz.graph_reps, sz.eager_reps)
            wall = []
            for _ in range(sz.sync_reps):
                bk.synchronize()
                t0 = time.perf_counter()
                call()
                bk.synchronize()
                wall.append((time.perf_counter() - t0) * 1e6)
            gs = stats(graph)
            flops = 2.0 * n * 3 * h * f
            min_bytes = 3 * h * f * 2 + 2 * n * h * 2
            row = {"shape": shape, "h": h, "f": f, "tokens": n, "nrot": nrot, "weight_bytes": wbytes}
            if rel_err is not None:
                row["rel_err"] = rel_err
            row.update({
                "graph_us": gs, "graph_calls_per_replay": G, "eager_us": stats(eager),
                "eager_sync_wall_us": stats(wall), "TFLOPs": flops / (gs["median"] * 1e-6) / 1e12,
                "GBps": min_bytes / (gs["median"] * 1e-6) / 1e9, "flops": flops, "min_bytes": min_bytes,
            })
            rows.append(row)
    return {
        "dtype": "bfloat16",
        "op": ("out = torch.mm(F.silu(torch.mm(x, W1)) * torch.mm(x, W3), W2); W1, W3: [h, f] row-major, W2: "
               "[f, h] row-major, x: [n, h]; 5 kernels in eager mode"),
        "data": "torch.randn; W1, W3 scaled 1/sqrt(h), W2 scaled 1/sqrt(f)",
        "rotation": (f"nrot weight sets (and nrot input sets) per shape, nrot = ceil({sz.gpu_rotation_bytes // MIB} "
                     f"MiB / weight bytes); consecutive calls cycle through them so weights are not reused from L2 "
                     f"(L2 = {l2} bytes)"),
        "metrics": {
            "graph_us": ("GPU time per call: a CUDA graph holding G = max(nrot,4) consecutive calls is replayed; "
                         "events around each replay; per-call = replay time / G; median over reps. No launch gaps: "
                         "the pure kernel time"),
            "eager_us": ("events around each call while calls are enqueued back to back (no sync between); median; "
                         "includes launch gaps when the CPU cannot keep the GPU busy"),
            "eager_sync_wall_us": ("host wall clock of one call + torch.cuda.synchronize() starting from an idle "
                                   "GPU; median; launch latency included"),
            "TFLOPs": "2*n*3*h*f / graph time",
            "GBps": "(3*h*f*2 + 2*n*h*2) bytes / graph time (weights once + x in + out; intermediates not counted)",
            "rel_err": "||out - ref|| / ||ref|| with ref computed in fp32 from the same bf16 inputs (n <= 64)",
        },
        "gpu_state_start": state_start,
        "rows": rows,
    }


# ----- CPU expert -----------------------------------------------------------------------------------------
def _cpu_row(torch, shape, h, f, dtype_name, n, W, threads, budget_s, reps_range):
    X = torch.randn(n, h).to(W[0][0].dtype)
    rot = {"i": 0}

    def call():
        w = W[rot["i"] % len(W)]
        rot["i"] += 1
        swiglu(torch, X, *w)

    t0 = time.perf_counter()
    call()
    first_ms = (time.perf_counter() - t0) * 1e3
    call()
    call()  # 2 warm-up calls after the first
    R = int(min(max(budget_s / max(first_ms * 1e-3, 1e-9), reps_range[0]), reps_range[1]))
    ms = []
    for _ in range(R):
        t0 = time.perf_counter()
        call()
        ms.append((time.perf_counter() - t0) * 1e3)
    st = stats(ms)
    wbytes = 3 * h * f * W[0][0].element_size()
    row = {"shape": shape, "h": h, "f": f, "dtype": dtype_name, "tokens": n, "nrot": len(W), "weight_bytes": wbytes,
           "first_call_ms": first_ms, "ms": st,
           "GFLOPs": 2.0 * n * 3 * h * f / (st["median"] * 1e-3) / 1e9,
           "GBps_weights": wbytes / (st["median"] * 1e-3) / 1e9}
    if threads is not None:
        row["threads"] = threads
    return row, first_ms


def measure_expert_cpu(torch, bk, sz: Sizes) -> dict:
    """``expert_cpu.json``: the expert on the host CPU by shape, dtype and tokens (all threads), and a
    thread sweep (``rows_by_threads``)."""
    default_threads = torch.get_num_threads()
    threads_list = sorted({t for t in (1, 2, 4, 8, 16, 32, 64, 128) if t < default_threads} | {default_threads})
    rows, by_threads, skipped = [], [], []
    try:
        for shape, (h, f) in sz.cpu_shapes.items():
            for dname in sz.cpu_dtypes:
                dt = getattr(torch, dname)
                esize = torch.empty(0, dtype=dt).element_size()
                nrot = nrot_for(3 * h * f * esize, sz.cpu_rotation_bytes)
                W = _gen_weights(torch, bk, h, f, dt, nrot, torch.device("cpu"))
                torch.set_num_threads(default_threads)
                too_slow = False
                for n in sz.cpu_tokens:
                    if too_slow:
                        skipped.append({"shape": shape, "dtype": dname, "tokens": n,
                                        "why": "an earlier token count's first call exceeded 2 s"})
                        continue
                    row, first = _cpu_row(torch, shape, h, f, dname, n, W, None, sz.cpu_budget_s, sz.cpu_reps)
                    rows.append(row)
                    too_slow = first > 2000.0
                if shape in sz.thread_shapes:
                    for n in sz.thread_tokens:
                        for t in threads_list:
                            torch.set_num_threads(t)
                            row, first = _cpu_row(torch, shape, h, f, dname, n, W, t, sz.thread_budget_s,
                                                  sz.thread_reps)
                            by_threads.append(row)
                            if first > 5000.0:
                                skipped.append({"shape": shape, "dtype": dname, "tokens": n, "threads": "< " + str(t),
                                                "why": "first call exceeded 5 s; fewer threads not tried"})
                                break
                    torch.set_num_threads(default_threads)
                del W
    finally:
        torch.set_num_threads(default_threads)
    try:
        bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - a fact, best effort
        bf16 = None
    src = "on the GPU" if bk.is_cuda else "on the CPU"
    return {
        "torch_num_threads_default": default_threads,
        "torch_num_threads_used": default_threads,
        "os_cpu_count": __import__("os").cpu_count(),
        "cpu_model": machine_cpu_model(),
        "mkldnn_bf16_supported": bf16,
        "op": f"same SwiGLU expert with torch.mm on CPU tensors; weights generated {src} and copied to host",
        "rotation": (f"nrot = ceil({sz.cpu_rotation_bytes // MIB} MiB / weight bytes) weight copies cycled per call "
                     "(defeats the CPU caches)"),
        "timing": (f"host wall clock per call (perf_counter); 2 warm-up calls; R = clamp({sz.cpu_budget_s:g} s / "
                   f"first-call time, {sz.cpu_reps[0]}, {sz.cpu_reps[1]}) timed calls; median. A (shape, dtype) whose "
                   "first call exceeds 2 s is skipped from that token count on. rows_by_threads: the same with "
                   f"torch.set_num_threads(threads), R = clamp({sz.thread_budget_s:g} s / first, {sz.thread_reps[0]}, "
                   f"{sz.thread_reps[1]})"),
        "rows": rows,
        "rows_by_threads": by_threads,
        "skipped": skipped,
    }


def machine_cpu_model() -> str:
    from validate.harness import cpu_model

    return cpu_model()


# ----- attention / dense block ------------------------------------------------------------------------------
def dense_block(torch, x, kc, vc, W, heads: int, kv_heads: int, d: int):
    """One decode block's dense part for ``x`` [B, h] against a KV cache ``kc``/``vc`` [B, kv, ctx, d]:
    RMSNorm, Q/K/V, the new token's K/V written into the cache's last slot, scaled-dot-product
    attention (grouped-query heads expanded as views), output projection, residual, RMSNorm,
    router logits, softmax and top-2. RoPE is left out (element-wise, small next to the rest)."""
    F = torch.nn.functional
    B = x.shape[0]
    y = F.rms_norm(x, (x.shape[-1],), W["n1"])
    q = (y @ W["q"]).view(B, heads, 1, d)
    kc[:, :, -1] = (y @ W["k"]).view(B, kv_heads, d)
    vc[:, :, -1] = (y @ W["v"]).view(B, kv_heads, d)
    g = heads // kv_heads
    k = kc if g == 1 else kc[:, :, None].expand(B, kv_heads, g, *kc.shape[2:]).reshape(B, heads, *kc.shape[2:])
    v = vc if g == 1 else vc[:, :, None].expand(B, kv_heads, g, *vc.shape[2:]).reshape(B, heads, *vc.shape[2:])
    a = F.scaled_dot_product_attention(q, k, v)
    x = x + a.reshape(B, heads * d) @ W["o"]
    y = F.rms_norm(x, (x.shape[-1],), W["n2"])
    return torch.topk(torch.softmax(y @ W["r"], dim=-1), 2, dim=-1)


def measure_attention(torch, bk, sz: Sizes) -> dict:
    """``attention.json``: dense decode-block time by shape, batch and context (graph and eager)."""
    dev = bk.device
    dt = torch.bfloat16 if bk.is_cuda else torch.float32
    esz = torch.empty(0, dtype=dt).element_size()
    rows = []
    state_start = gpu_state()
    for shape, (h, heads, kvh, d, E) in sz.attn_shapes.items():
        W = {"q": torch.randn(h, heads * d, device=dev, dtype=dt) / math.sqrt(h),
             "k": torch.randn(h, kvh * d, device=dev, dtype=dt) / math.sqrt(h),
             "v": torch.randn(h, kvh * d, device=dev, dtype=dt) / math.sqrt(h),
             "o": torch.randn(heads * d, h, device=dev, dtype=dt) / math.sqrt(heads * d),
             "r": torch.randn(h, E, device=dev, dtype=dt) / math.sqrt(h),
             "n1": torch.ones(h, device=dev, dtype=dt), "n2": torch.ones(h, device=dev, dtype=dt)}
        wbytes = sum(t.numel() for t in W.values()) * esz
        for B in sz.attn_batches:
            for ctx in sz.attn_contexts:
                kv_bytes = 2 * B * kvh * ctx * d * esz
                nrot = min(nrot_for(kv_bytes, 2 * bk.l2_bytes()), sz.attn_max_rot)
                caches = [(torch.randn(B, kvh, ctx, d, device=dev, dtype=dt),
                           torch.randn(B, kvh, ctx, d, device=dev, dtype=dt)) for _ in range(nrot)]
                X = torch.randn(B, h, device=dev, dtype=dt)
                rot = {"i": 0}

                def call():
                    kc, vc = caches[rot["i"] % nrot]
                    rot["i"] += 1
                    return dense_block(torch, X, kc, vc, W, heads, kvh, d)

                G = max(nrot, 4)

                def many():
                    for j in range(G):
                        dense_block(torch, X, *caches[j % nrot], W, heads, kvh, d)

                graph, eager = graph_and_eager_us(bk, call, many, G, 2, sz.attn_graph_reps, sz.attn_eager_reps)
                rows.append({"shape": shape, "h": h, "heads": heads, "kv_heads": kvh, "head_dim": d, "experts": E,
                             "batch": B, "context": ctx, "nrot": nrot, "weight_bytes": wbytes, "kv_bytes": kv_bytes,
                             "graph_us": stats(graph), "graph_calls_per_replay": G, "eager_us": stats(eager)})
                caches.clear()  # free the KV caches before the next size
    return {
        "dtype": str(dt).replace("torch.", ""),
        "device": bk.name,
        "op": ("one decode block's dense part: RMSNorm; Q, K, V projections; the token's K/V written into the "
               "cache's last slot; scaled_dot_product_attention over a KV cache of `context` tokens (GQA heads "
               "expanded); output projection + residual; RMSNorm; router logits, softmax, top-2. RoPE left out"),
        "rotation": (f"nrot KV caches per (shape, batch, context) cycled, nrot = min(ceil(2 x L2 / KV bytes), "
                     f"{sz.attn_max_rot}); weights are not rotated (larger than L2 at the real shapes)"),
        "metrics": {
            "graph_us": ("time per call from a replayed CUDA graph of G = max(nrot, 4) calls (pure GPU time); on the "
                         "CPU the plain calls timed with the host clock"),
            "eager_us": ("events around each call while calls are enqueued back to back (includes launch gaps); on "
                         "the CPU the host clock per call"),
        },
        "gpu_state_start": state_start,
        "rows": rows,
    }

# ----- the whole run ----------------------------------------------------------------------------------------
def _merge(path: Path, new: dict) -> dict:
    """``new`` over what ``path`` already holds (parts may be measured in separate runs)."""
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
        old.update(new)
        return old
    return new


def parse_parts(text: str | None) -> list[str]:
    """``"expert,copies"`` -> ``["expert", "copies"]``; ``None``/``"all"`` -> every part."""
    if text is None or text.strip() in ("", "all"):
        return list(PARTS)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
    return parts


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def run_measure(out_dir: str | Path, parts=None, device: str | None = None, quick: bool = False,
                emulate_cuda: bool = False, log=print) -> dict:
    """Measure ``parts`` on ``device`` and write the measurement folder ``out_dir``.

    Returns ``{"written": [paths], "skipped": [{"part", "reason"}], "seconds": s}``."""
    import torch

    parts = parse_parts(parts) if isinstance(parts, (str, type(None))) else list(parts)
    device = device or default_device()
    if device == "cuda" and emulate_cuda:
        raise ValueError("emulate_cuda is for device cpu")
    bk = make_backend(device, emulate_cuda=emulate_cuda)
    sz = sizes(quick)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cuda_like = bk.is_cuda or emulate_cuda
    skipped = []
    if not cuda_like:
        for p in parts:
            if p in CUDA_PARTS:
                reason = (f"part '{p}' needs a CUDA device (CUDA events, streams, graphs, pinned memory); "
                          f"device is {device}: not measured")
                skipped.append({"part": p, "reason": reason})
                log(f"skipped    {reason}")
    run_parts = [p for p in parts if cuda_like or p not in CUDA_PARTS]
    written = []
    T0 = time.perf_counter()

    env = machine_facts(torch)
    env["device_requested"] = device
    if cuda_like:
        t0 = time.perf_counter()
        env.update(measure_env_device(torch, bk, sz))
        log(f"env        device copy and GEMM ({time.perf_counter() - t0:.1f} s)")
    else:
        env["device"] = bk.props()
        reason = "device-to-device copy and bf16 GEMM need a CUDA device: not measured"
        skipped.append({"part": "env.d2d_copy+gemm_bf16", "reason": reason})
        log(f"skipped    {reason}")
    if "launch" in run_parts:
        t0 = time.perf_counter()
        env["host_overheads"] = measure_launch(torch, bk, sz)
        log(f"launch     host overheads ({time.perf_counter() - t0:.1f} s)")

    link: dict = {}
    if "copies" in run_parts:
        t0 = time.perf_counter()
        link.update(measure_copies(torch, bk, sz))
        log(f"copies     {len(link['transfers'])} transfers, both directions, expert series "
            f"({time.perf_counter() - t0:.1f} s)")
    if "interference" in run_parts:
        t0 = time.perf_counter()
        link["concurrent_copy_and_kernel"] = measure_interference(torch, bk, sz)
        log(f"interference {len(link['concurrent_copy_and_kernel']['cases'])} cases ({time.perf_counter() - t0:.1f} s)")
    if link:
        t0 = time.perf_counter()
        link["gpu_state_end"] = gpu_state()
        link["_meta"] = _meta("link", sz, bk, T0, torch, [p for p in run_parts if p in ("copies", "interference")])
        written.append(write_json_atomic(out / "link.json", _merge(out / "link.json", link)))

    if "expert" in run_parts:
        t0 = time.perf_counter()
        g = measure_expert_gpu(torch, bk, sz)
        g["gpu_state_end"] = gpu_state()
        g["_meta"] = _meta("expert_gpu", sz, bk, t0, torch, ["expert"])
        written.append(write_json_atomic(out / "expert_gpu.json", g))
        log(f"expert     {len(g['rows'])} rows ({time.perf_counter() - t0:.1f} s)")
    if "cpu" in run_parts:
        t0 = time.perf_counter()
        c = measure_expert_cpu(torch, bk, sz)
        c["_meta"] = _meta("expert_cpu", sz, bk, t0, torch, ["cpu"])
        written.append(write_json_atomic(out / "expert_cpu.json", c))
        log(f"cpu        {len(c['rows'])} rows + {len(c['rows_by_threads'])} thread-sweep rows "
            f"({time.perf_counter() - t0:.1f} s)")

    if "attention" in run_parts:
        t0 = time.perf_counter()
        at = measure_attention(torch, bk, sz)
        at["gpu_state_end"] = gpu_state()
        at["_meta"] = _meta("attention", sz, bk, t0, torch, ["attention"])
        written.append(write_json_atomic(out / "attention.json", at))
        log(f"attention  {len(at['rows'])} rows ({time.perf_counter() - t0:.1f} s)")

    env["gpu_state_end"] = gpu_state()
    env["skipped_parts"] = skipped
    env["_meta"] = _meta("env", sz, bk, T0, torch, run_parts)
    written.insert(0, write_json_atomic(out / "env.json", _merge(out / "env.json", env)))
    problems = check_format(out)
    for p in problems:
        log(f"format     {p}")
    return {"written": [str(p) for p in written], "skipped": skipped, "format_problems": problems,
            "seconds": time.perf_counter() - T0}


# ----- format check against the external data set ---------------------------------------------------------
#: keys that may be null where the reference has a value (no nvidia-smi, no CUDA build of torch)
NULLABLE = {"nvidia_smi", "nvidia_smi_query", "nvidia_smi_topo", "gpu_state_start", "gpu_state_end", "torch_cuda",
            "mkldnn_bf16_supported", "L2_cache_size", "multi_processor_count", "total_memory", "major", "minor"}
_MM_KEY = re.compile(r"^mm_1x\d+x\d+_bf16$")


def reference_dir() -> Path:
    """The external H100 folder whose layout this harness reproduces."""
    return Path(__file__).resolve().parent / "measurements" / "external" / "h100-sxm"


def _norm_key(k: str) -> str:
    return "mm_1xHxH_bf16" if _MM_KEY.match(k) else k


def _shape_diff(ref, new, where: str, out: list) -> None:
    if isinstance(ref, dict):
        if not isinstance(new, dict):
            out.append(f"{where}: expected an object, got {type(new).__name__}")
            return
        nk = {_norm_key(k): v for k, v in new.items()}
        for k, v in ref.items():
            k2 = _norm_key(k)
            if k2 not in nk:
                if k2 == "mmap_cudaHostRegister" and "mmap_cudaHostRegister_skipped" in nk:
                    continue
                out.append(f"{where}.{k}: missing")
                continue
            _shape_diff(v, nk[k2], f"{where}.{k}", out)
    elif isinstance(ref, list):
        if not isinstance(new, list):
            out.append(f"{where}: expected a list, got {type(new).__name__}")
        elif ref and new:
            _shape_diff(ref[0], new[0], f"{where}[0]", out)
        elif ref and not new:
            out.append(f"{where}: empty list (the reference has entries)")
    elif isinstance(ref, bool):
        if not isinstance(new, bool) and new is not None:
            out.append(f"{where}: expected a boolean, got {type(new).__name__}")
    elif isinstance(ref, (int, float)):
        if new is None and where.rsplit(".", 1)[-1] in NULLABLE:
            return
        if isinstance(new, bool) or not isinstance(new, (int, float)):
            out.append(f"{where}: expected a number, got {type(new).__name__}")
    elif isinstance(ref, str):
        if new is None and where.rsplit(".", 1)[-1] in NULLABLE:
            return
        if not isinstance(new, str):
            out.append(f"{where}: expected a string, got {type(new).__name__}")


def check_format(path: str | Path, reference: str | Path | None = None) -> list[str]:
    """Differences in layout (missing keys, wrong types) between the measurement folder ``path`` and
    the external reference folder, for the files ``path`` holds; ``[]`` when they match. Values
    are not compared; lists are compared by their first entry."""
    ref_dir = Path(reference) if reference is not None else reference_dir()
    out: list[str] = []
    for fname in ("env.json", "link.json", "expert_gpu.json", "expert_cpu.json"):
        p = Path(path) / fname
        if not p.is_file():
            continue
        ref = json.loads((ref_dir / fname).read_text(encoding="utf-8"))
        new = json.loads(p.read_text(encoding="utf-8"))
        if fname == "env.json":  # host_overheads / device facts come only from the parts that make them
            if "host_overheads" not in new:
                ref.pop("host_overheads", None)
            if "gemm_bf16" not in new:
                ref.pop("gemm_bf16", None)
                ref.pop("d2d_copy", None)
        if fname == "link.json":
            for k in ("transfers", "bidirectional_pinned", "expert_sized_h2d_series", "method", "gpu_state_start",
                      "pinned_alloc_s_for_max_size", "concurrent_copy_and_kernel"):
                if k not in new:
                    ref.pop(k, None)
        _shape_diff(ref, new, fname, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m validate.measure --out DIR [--parts ...] [--device ...] [--quick]`` (no moesim
    dependencies needed beyond torch and numpy)."""
    import argparse

    ap = argparse.ArgumentParser(description="moesim component measurements")
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="all", help=",".join(PARTS))
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    res = run_measure(a.out, a.parts, a.device, a.quick)
    for p in res["written"]:
        print(f"wrote      {p}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
