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

    def __init__(self, model: ModelSpec, hw: HardwareSpec):
        self.model = model
        self.hw = hw
        g = hw.gpu
        self.fixed_s = g.kernel_fixed_us * 1e-6
        self.mem_bw = g.hbm_bandwidth_gb_s * 1e9 * g.memory_efficiency
        self.flops_dense = g.peak_tflops.for_dtype(model.dtype) * 1e12 * g.compute_efficiency
        self.flops_expert = (
            g.peak_tflops.for_dtype(model.expert_dtype or model.dtype) * 1e12 * g.compute_efficiency
        )
        self._table = self._match_table()
        self.expert_source = "profile table " + hw.expert_profile if self._table is not None else "roofline"

    # ----- roofline -----------------------------------------------------------------------------
    def roofline(self, flops: float, nbytes: float, kernels: int, peak_flops: float | None = None) -> OpTime:
        """Roofline time of an op of ``flops`` FLOPs moving ``nbytes`` bytes in ``kernels`` kernels."""
        tf = flops / (peak_flops or self.flops_dense)
        tb = nbytes / self.mem_bw
        return OpTime(max(tf, tb) + kernels * self.fixed_s, tb >= tf)

    def _expert_roofline(self, tokens: np.ndarray, kernels: int) -> tuple[np.ndarray, np.ndarray]:
        m = self.model
        n = tokens.astype(np.float64)
        flops = m.expert_flops(1) * n
        act = n * (2 * m.hidden_size + 3 * m.moe_intermediate_size) * m.bytes_per_param
        nbytes = m.expert_bytes + act
        tf = flops / self.flops_expert
        tb = nbytes / self.mem_bw
        t = np.maximum(tf, tb) + kernels * self.fixed_s
        t = np.where(n > 0, t, 0.0)
        return t, tb >= tf

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

    def expert_times(self, tokens, kernels: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """GPU time (s) of one expert FFN for each token count in ``tokens`` and memory-bound flags.

        ``kernels`` is the number of kernels the expert runs as (their fixed times are included; a
        measured table already includes its own)."""
        tok = np.asarray(tokens, dtype=np.float64)
        roof, membound = self._expert_roofline(tok, kernels)
        if self._table is None:
            return roof, membound
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
    def cpu_expert_times(self, tokens) -> np.ndarray:
        """Host-CPU time (s) of one expert for each token count in ``tokens``: a measured CPU table
        (``HardwareSpec.cpu_expert_profile``) where shape and dtype match, else a roofline of the
        expert's bytes over the CPU's DRAM bandwidth and its FLOPs over peak x efficiency. Decode
        expert math on a CPU is bound by DRAM bandwidth."""
        tok = np.asarray(tokens, dtype=np.float64)
        m, cpu = self.model, self.hw.cpu
        table = self._cpu_table()
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
        tb = m.expert_bytes / (cpu.dram_bandwidth_gb_s * 1e9)
        return np.where(tok > 0, np.maximum(tf, tb), 0.0)

    def _cpu_table(self):
        name = self.hw.cpu_expert_profile
        if not name:
            return None
        table = load_profile_table(name)
        m = self.model
        dtype = m.expert_dtype or m.dtype
        rows = [
            r for r in table["rows"]
            if r["h"] == m.hidden_size and r["f"] == m.moe_intermediate_size and r["dtype"] == dtype
        ]
        if len(rows) < 2 or not m.ffn_gated:
            return None
        rows.sort(key=lambda r: r["tokens"])
        return (np.array([r["tokens"] for r in rows], float), np.array([r["ms"] for r in rows], float) * 1e-3)

    @property
    def cpu_expert_source(self) -> str:
        """Where CPU expert times come from."""
        return "profile table " + self.hw.cpu_expert_profile if self._cpu_table() is not None else "roofline"

    # ----- dense parts ----------------------------------------------------------------------------
    def block_dense(self, layer: int, batch: int, kernels: int) -> OpTime:
        """Non-expert part of block ``layer`` for ``batch`` tokens, without the attention core
        (projections, router and shared experts, or the dense FFN)."""
        m = self.model
        params = m.block_dense_params(layer)
        flops = 2.0 * params * batch
        nbytes = params * m.bytes_per_param + 4.0 * batch * m.hidden_size * m.bytes_per_param
        return self.roofline(flops, nbytes, kernels)

    def attention_core(self, batch: int, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Attention score/value time (s) of ``batch`` sequences at each context length in
        ``context`` (KV bytes read grow with context); no fixed kernel time (counted in
        :meth:`block_dense`)."""
        m = self.model
        c = np.asarray(context, dtype=np.float64)
        flops = batch * m.attention_core_flops(1) * c
        nbytes = batch * m.kv_bytes_per_token_layer * c
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
