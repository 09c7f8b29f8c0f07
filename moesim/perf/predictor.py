"""GPU execution-time prediction for the ops of one decode step.

The roofline estimate of an op is ``max(flops / (peak * compute_efficiency), bytes /
(hbm_bandwidth * memory_efficiency))`` plus ``kernel_fixed_us`` per kernel. Where a measured profile
table exists for the expert's shape and dtype on this GPU (``HardwareSpec.expert_profile``), the
expert op time is interpolated from it instead (linear in tokens between measured counts, linear
extrapolation beyond). Times are seconds. An op is *memory-bound* when its byte term exceeds its
FLOP term; copy interference applies the memory-bound slow-down to such ops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from moesim.errors import InputError
from moesim.hardware.spec import HardwareSpec
from moesim.models.spec import ModelSpec

TABLE_PACKAGE = "moesim.perf"
TABLE_OP_KERNELS = 5  # kernels of the measured expert op (see validate/measurements/external)


@dataclass(frozen=True)
class OpTime:
    """Predicted GPU time of one op (seconds) and whether it is memory-bound."""

    time_s: float
    memory_bound: bool


@lru_cache(maxsize=None)
def load_profile_table(name: str) -> dict:
    """A measured expert-time table from ``moesim/perf/tables/<name>-expert.json``."""
    fname = f"{name}-expert.json"
    try:
        text = resources.files(TABLE_PACKAGE).joinpath("tables", fname).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"no profile table {fname!r} in moesim/perf/tables", field="hardware.expert_profile") from None
    return json.loads(text)


class Predictor:
    """Predicts op times of ``model`` on ``hw``'s GPU (roofline, or measured tables for experts)."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, dequant: str = "free", dequant_ops: dict | None = None):
        self.model = model
        self.hw = hw
        g = hw.gpu
        self.fixed_s = g.kernel_fixed_us * 1e-6
        self.mem_bw = g.hbm_bandwidth_gb_s * 1e9 * g.memory_efficiency
        self.flops_dense = g.peak_tflops.for_dtype(model.dtype) * 1e12 * g.compute_efficiency
        self.flops_expert = (
            g.peak_tflops.for_dtype(model.expert_dtype or model.dtype) * 1e12 * g.compute_efficiency
        )
        # dequantisation of packed expert weights (moesim.perf.dequant); "free" = the plain roofline
        self.dequant, self._dq_ops = dequant, dict(dequant_ops or {})
        self._dq = self.dequant_cost(model.expert_dtype or model.dtype)
        self._table = self._match_table()
        self.expert_source = "profile table " + hw.expert_profile if self._table is not None else "roofline"

    # ----- roofline -----------------------------------------------------------------------------
    def roofline(self, flops: float, nbytes: float, kernels: int, peak_flops: float | None = None) -> OpTime:
        """Roofline time of an op of ``flops`` FLOPs moving ``nbytes`` bytes in ``kernels`` kernels."""
        tf = flops / (peak_flops or self.flops_dense)
        tb = nbytes / self.mem_bw
        return OpTime(max(tf, tb) + kernels * self.fixed_s, tb >= tf)

    def _expert_roofline(self, tokens: np.ndarray, kernels: int, size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        m = self.model
        n = tokens.astype(np.float64)
        if size == 1.0:
            flops = m.expert_flops(1) * n
            act = n * (2 * m.hidden_size + 3 * m.moe_intermediate_size) * m.bytes_per_param
            nbytes = m.expert_bytes + act
        else:  # a heterogeneous expert of width size x moe_intermediate_size (HMoE)
            flops = m.expert_flops(1) * size * n
            act = n * (2 * m.hidden_size + 3 * size * m.moe_intermediate_size) * m.bytes_per_param
            nbytes = int(round(size * m.expert_bytes)) + act
        if self._dq.alu_s or self._dq.pass_s:
            return self._dequant_roof(n, flops, act, size * m.expert_params, m.expert_bytes_per_param, self._dq,
                                      self.flops_expert, kernels)
        tf = flops / self.flops_expert
        tb = nbytes / self.mem_bw
        t = np.maximum(tf, tb) + kernels * self.fixed_s
        t = np.where(n > 0, t, 0.0)
        return t, tb >= tf

    def dequant_cost(self, fmt: str, params: float | None = None, bytes_per_param: float | None = None):
        """Dequantisation cost of one expert op (``params`` weights, default one expert's) stored as
        ``fmt`` under this predictor's mode (:func:`moesim.perf.dequant.dequant_cost`)."""
        from moesim.perf.dequant import dequant_cost

        return dequant_cost(self.dequant, fmt, self.model.expert_params if params is None else params, self.hw.gpu,
                            bytes_per_param=bytes_per_param, ops_override=self._dq_ops, mem_bw=self.mem_bw,
                            fixed_s=self.fixed_s)

    def _dequant_roof(self, n, flops, act, params, bytes_per_param, dq, peak, kernels):
        # fused: a third roof (the unpacking arithmetic); separate: an extra pass, then a 16-bit GEMM
        if dq.gemm_bytes_per_param is not None:
            wbytes = params * dq.gemm_bytes_per_param
            peak = self.hw.gpu.peak_tflops.for_dtype(dq.gemm_dtype) * 1e12 * self.hw.gpu.compute_efficiency
        else:
            wbytes = params * bytes_per_param
        tf = flops / peak
        tb = (wbytes + act) / self.mem_bw
        t = np.maximum(np.maximum(tf, tb), dq.alu_s) + dq.pass_s + kernels * self.fixed_s
        return np.where(n > 0, t, 0.0), tb >= tf

    def expert_times_as(self, tokens, kernels: int, fmt: str, bytes_per_param: float | None = None,
                        math_dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Roofline GPU time (s) of one expert stored as ``fmt`` instead of the model's expert dtype
        (a lower-precision copy), with this predictor's dequantisation mode, and memory-bound flags.
        ``bytes_per_param`` overrides the format table (a nested bit-slice depth); ``math_dtype``
        picks the peak the multiply runs at (default: the format's own)."""
        from moesim.models.spec import BYTES_PER_PARAM

        m = self.model
        n = np.asarray(tokens, dtype=np.float64)
        bpp = BYTES_PER_PARAM[fmt] if bytes_per_param is None else bytes_per_param
        g = self.hw.gpu
        peak = g.peak_tflops.for_dtype(math_dtype or fmt) * 1e12 * g.compute_efficiency
        flops = m.expert_flops(1) * n
        act = n * (2 * m.hidden_size + 3 * m.moe_intermediate_size) * m.bytes_per_param
        dq = self.dequant_cost(fmt, bytes_per_param=bpp)
        return self._dequant_roof(n, flops, act, m.expert_params, bpp, dq, peak, kernels)

    # ----- measured tables ------------------------------------------------------------------------
    def _match_table(self):
        name = self.hw.expert_profile
        if not name:
            return None
        table = load_profile_table(name)
        m = self.model
        if (m.expert_dtype or m.dtype) != table.get("dtype") or not m.ffn_gated:
            return None
        rows = [r for r in table["rows"] if r["h"] == m.hidden_size and r["f"] == m.moe_intermediate_size]
        if len(rows) < 2:
            return None
        rows.sort(key=lambda r: r["tokens"])
        return (
            np.array([r["tokens"] for r in rows], dtype=np.float64),
            np.array([r["graph_us"] for r in rows], dtype=np.float64) * 1e-6,
        )

    def expert_times(self, tokens, kernels: int = 5, size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """GPU time (s) of one expert FFN for each token count in ``tokens`` and memory-bound flags.

        ``kernels`` is the number of kernels the expert runs as (their fixed times are included; a
        measured table already includes its own). ``size``: the expert's FFN width over
        ``moe_intermediate_size`` (heterogeneous experts): FLOPs, weight bytes and the intermediate
        activations scale with it; a measured table (taken at width 1) is scaled by the ratio of
        the roofline at ``size`` to the roofline at width 1."""
        tok = np.asarray(tokens, dtype=np.float64)
        roof, membound = self._expert_roofline(tok, kernels, size)
        if self._table is None:
            return roof, membound
        if size != 1.0:
            roof1, _ = self._expert_roofline(tok, kernels)
            scale = np.divide(roof, roof1, out=np.ones_like(roof), where=roof1 > 0)
            t1, _ = self.expert_times(tok, kernels)
            return t1 * scale, membound
        xs, ys = self._table
        t = np.interp(tok, xs, ys)
        hi = tok > xs[-1]
        if hi.any():
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            t = np.where(hi, ys[-1] + slope * (tok - xs[-1]), t)
        t = np.where(tok > 0, t, 0.0)
        return t, membound

    def expert_fixed_s(self, kernels: int = 5) -> float:
        """Fixed per-kernel GPU time (s) contained in one predicted expert op: a fused grouped
        kernel pays it once for all its experts. A measured table's op is the 5-kernel SwiGLU
        (3 GEMMs, activation, multiply)."""
        return (TABLE_OP_KERNELS if self._table is not None else kernels) * self.fixed_s

    # ----- CPU experts -------------------------------------------------------------------------------
    def cpu_expert_times(self, tokens, threads: int | None = None) -> np.ndarray | None:
        """Host-CPU time (s) of one expert for each token count in ``tokens``: a measured CPU table
        (``HardwareSpec.cpu_expert_profile``) where shape and dtype match, else a roofline of the
        expert's bytes (times ``cpu.weight_passes`` of its dtype) over the CPU's DRAM bandwidth and
        its FLOPs over peak x efficiency, the larger of the two (or their sum when
        ``cpu.overlap_compute_and_memory`` is false), plus ``cpu.call_overhead_us``. Decode
        expert math on a CPU is bound by DRAM bandwidth. With ``threads``: only a table measured
        at exactly that many threads, else None (the caller models the threads itself, see
        :mod:`moesim.perf.cpu`)."""
        tok = np.asarray(tokens, dtype=np.float64)
        m, cpu = self.model, self.hw.cpu
        table = self._cpu_table(threads)
        if threads is not None and table is None:
            return None
        if table is not None:
            xs, ys = table
            t = np.interp(tok, xs, ys)
            hi = tok > xs[-1]
            if hi.any():
                slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
                t = np.where(hi, ys[-1] + slope * (tok - xs[-1]), t)
            return np.where(tok > 0, t, 0.0)
        dtype = m.expert_dtype or m.dtype
        peak = cpu.peak_gflops_bf16 if dtype in ("bf16", "fp16", "fp8", "int8", "int4") else cpu.peak_gflops_fp32
        tf = m.expert_flops(1) * tok / (peak * 1e9 * cpu.compute_efficiency)
        # weight passes per call (re-layout), overlap or not, fixed per-call cost: moesim.hardware.spec.CpuSpec
        tb = cpu.passes(dtype) * m.expert_bytes / (cpu.dram_bandwidth_gb_s * 1e9)
        t = np.maximum(tf, tb) if cpu.overlap_compute_and_memory else tf + tb
        return np.where(tok > 0, t + (cpu.call_overhead_us or 0.0) * 1e-6, 0.0)

    def _cpu_table(self, threads: int | None = None):
        name = self.hw.cpu_expert_profile
        if not name:
            return None
        table = load_profile_table(name)
        m = self.model
        dtype = m.expert_dtype or m.dtype
        rows = [
            r for r in table["rows"]
            if r["h"] == m.hidden_size and r["f"] == m.moe_intermediate_size and r["dtype"] == dtype
            and (threads is None or r.get("threads") == threads)
        ]
        if len(rows) < 2 or not m.ffn_gated:
            return None
        rows.sort(key=lambda r: r["tokens"])
        return (np.array([r["tokens"] for r in rows], float), np.array([r["ms"] for r in rows], float) * 1e-3)

    @property
    def cpu_expert_source(self) -> str:
        """Where CPU expert times come from (an execution policy's thread/NUMA model, when one is
        set, says so in ``cpu_model_note``)."""
        base = "profile table " + self.hw.cpu_expert_profile if self._cpu_table() is not None else "roofline"
        note = getattr(self, "cpu_model_note", None)
        return base if note is None else f"{base}; {note}"

    # ----- whole blocks on the CPU (llama.cpp -ngl) ---------------------------------------------------
    def cpu_roofline(self, flops, nbytes, dtype: str):
        """Host-CPU time (s) of an op of ``flops`` FLOPs reading ``nbytes`` bytes from DRAM, its
        weights stored as ``dtype``: bytes over the CPU's DRAM bandwidth and FLOPs over the peak
        of that dtype x ``compute_efficiency`` (the CPU expert roofline's rule), the larger of the
        two (their sum when the CPU does not overlap them). Works on numpy arrays too."""
        cpu = self.hw.cpu
        peak = cpu.peak_gflops_bf16 if dtype in ("bf16", "fp16", "fp8", "int8", "int4") else cpu.peak_gflops_fp32
        tf = flops / (peak * 1e9 * cpu.compute_efficiency)
        tb = nbytes / (cpu.dram_bandwidth_gb_s * 1e9)
        if getattr(cpu, "overlap_compute_and_memory", True):
            return np.maximum(tf, tb)
        return tf + tb

    def cpu_block_dense(self, layer: int, batch: int) -> float:
        """Host-CPU time (s) of block ``layer``'s non-expert part for ``batch`` tokens without the
        attention core (what :meth:`block_dense` is on the GPU, no kernel fixed time)."""
        m = self.model
        params = m.block_dense_params(layer)
        nbytes = params * m.bytes_per_param + 4.0 * batch * m.hidden_size * m.bytes_per_param
        return float(self.cpu_roofline(2.0 * params * batch, nbytes, m.dtype))

    def cpu_attention_core(self, batch: int, context) -> np.ndarray:
        """Host-CPU attention score/value time (s) of one block for ``batch`` sequences at each
        context length in ``context``, reading their KV cache from host memory."""
        m = self.model
        c = np.asarray(context, dtype=np.float64)
        return self.cpu_roofline(batch * m.attention_core_flops(1) * c, batch * m.kv_bytes_per_token_layer * c,
                                 m.kv_dtype or m.dtype)

    def cpu_head(self, batch: int) -> float:
        """Host-CPU time (s) of the final norm, LM head and sampling for ``batch`` tokens."""
        m = self.model
        params = m.vocab_size * m.hidden_size
        nbytes = params * m.embedding_bytes_per_param + batch * m.vocab_size * 4
        return float(self.cpu_roofline(2.0 * params * batch, nbytes, m.embedding_dtype or m.dtype))

    # ----- dense parts ----------------------------------------------------------------------------
    def block_dense(self, layer: int, batch: int, kernels: int) -> OpTime:
        """Non-expert part of block ``layer`` for ``batch`` tokens, without the attention core
        (projections, router and shared experts, or the dense FFN)."""
        m = self.model
        params = m.block_dense_params(layer)
        flops = 2.0 * params * batch
        nbytes = params * m.bytes_per_param + 4.0 * batch * m.hidden_size * m.bytes_per_param
        return self.roofline(flops, nbytes, kernels)

    def attention_core(self, batch: int, context: np.ndarray, *, flop_split: int = 1,
                       kv_split: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Attention score/value time (s) of ``batch`` sequences at each context length in
        ``context`` (KV bytes read grow with context); no fixed kernel time (counted in
        :meth:`block_dense`). Under attention tensor parallelism one GPU does ``1/flop_split`` of
        the arithmetic (its query heads) and reads ``1/kv_split`` of the KV cache
        (:meth:`ModelSpec.kv_tp_shards`)."""
        m = self.model
        c = np.asarray(context, dtype=np.float64)
        flops = batch * m.attention_core_flops(1) * c / flop_split
        nbytes = batch * m.kv_bytes_per_token_layer * c / kv_split
        tf = flops / self.flops_dense
        tb = nbytes / self.mem_bw
        return np.maximum(tf, tb), tb >= tf

    def head(self, batch: int, kernels: int) -> OpTime:
        """Final norm, LM head and sampling for ``batch`` tokens."""
        m = self.model
        params = m.vocab_size * m.hidden_size
        flops = 2.0 * params * batch
        nbytes = params * m.embedding_bytes_per_param + batch * m.vocab_size * 4
        return self.roofline(flops, nbytes, kernels)


def build_predictor(model: ModelSpec, hw: HardwareSpec) -> Predictor:
    """The predictor for ``model`` on ``hw`` (roofline, with measured expert tables when present)."""
    return Predictor(model, hw)
