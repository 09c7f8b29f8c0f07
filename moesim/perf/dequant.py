"""The GPU cost of turning stored expert weights into numbers a matrix unit multiplies.

Formats a GPU multiplies natively (fp32, bf16, fp16; fp8 where the GPU has an fp8 peak; int8 where
it has an int8 peak) need nothing. Every other format is unpacked and scaled first. How that costs
time is a runtime setting (``runtime.dequant``), because it depends on the kernels a serving stack
ships, not on the format alone:

* ``free`` (the default, and moesim's behaviour before this model existed): the roofline over the
  *packed* bytes, as if unpacking were perfectly hidden in the memory stream;
* ``fused``: a kernel that unpacks in registers (llama.cpp's quantised mat-vec, Marlin, HQQ's fused
  kernels, BitNet's ternary kernels) has a third roof besides FLOPs and bytes: the unpacking
  arithmetic, ``params x ops_per_weight`` integer/float instructions on the CUDA cores at the GPU's
  fp32 peak x ``compute_efficiency`` (one instruction counted like one fp32 FLOP). The op takes the
  largest of the three. It does not grow with tokens: a decode kernel unpacks each weight tile once;
* ``separate``: dequantise-then-multiply (HQQ's PyTorch backend, bitsandbytes without fused kernels):
  one extra memory-bound pass per expert op reads the packed weights and writes them as 16-bit
  (``params x (bytes_per_param + 2)`` bytes at HBM bandwidth, with the unpacking arithmetic as its
  own roof, plus one kernel's fixed time), then a bf16 GEMM reads 2 bytes per weight.

``ops_per_weight`` counts the instructions of a straightforward unpack (shift and mask per packed
field, subtract zero or offset, multiply by the group scale, with k-quants' sub-block scales decoded
and amortised). They are stated assumptions, not measurements; ``runtime.dequant_ops_per_weight``
overrides any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.models.spec import BYTES_PER_PARAM

#: unpacking instructions per weight (assumed; see the module docstring)
DEQUANT_OPS_PER_WEIGHT = {
    "fp8": 1.0,  # convert to 16-bit (GPUs without fp8 matrix units)
    "int8": 2.0,  # convert, scale (GPUs without int8 matrix units)
    "int4": 2.0,  # shift + mask to int8
    "q8_0": 2.0,  # convert, block scale
    "q6_k": 5.0,  # two-part unpack (4 + 2 bits), offset, sub-block scale, super-block scale
    "q5_k": 5.0,  # two-part unpack (4 + 1 bits), sub-block scale and min
    "q4_k": 4.0,  # shift + mask, sub-block scale and min
    "q4_0": 3.0,  # shift + mask, offset, block scale
    "q3_k": 5.0,  # two-part unpack (2 + 1 bits), offset, sub-block scale
    "q2_k": 4.0,  # shift + mask, sub-block scale and min
    "hqq3": 3.0,  # shift + mask out of an int32 of ten, (q - zero) * scale
    "hqq2": 3.0,  # shift + mask, (q - zero) * scale
    "tq2_0": 2.0,  # shift + mask, minus one (int8 math)
    "tq1_0": 4.0,  # base-3 digit by multiply-shift, minus one (int8 math)
    "mwq": 2.0,  # a nested bit-slice stack cut at some depth (D2MoE): shift + mask
}
MODES = ("free", "fused", "separate")


def is_native(fmt: str, peak) -> bool:
    """Whether ``fmt`` is multiplied as stored on a GPU with peak table ``peak``
    (:class:`moesim.hardware.spec.PeakFlops`)."""
    if fmt in ("fp32", "bf16", "fp16"):
        return True
    if fmt == "fp8":
        return peak.fp8 is not None
    if fmt == "int8":
        return peak.int8 is not None
    return False


@dataclass(frozen=True)
class DequantCost:
    """The dequantisation cost of one expert op at one format (seconds, per op, token-independent).

    ``alu_s``: the unpacking roof (fused) or the extra pass's time (separate, fixed time included);
    ``gemm_bytes_per_param`` / ``gemm_dtype``: the weights the multiply then reads (separate: 16-bit)."""

    mode: str
    alu_s: float = 0.0
    pass_s: float = 0.0
    gemm_bytes_per_param: float | None = None
    gemm_dtype: str | None = None


def dequant_cost(mode: str, fmt: str, params: float, gpu, *, bytes_per_param: float | None = None,
                 ops_override: dict | None = None, mem_bw: float, fixed_s: float) -> DequantCost:
    """The cost of dequantising ``params`` weights stored as ``fmt`` on ``gpu`` (a
    :class:`~moesim.hardware.spec.GpuSpec`) under ``mode``; ``mem_bw`` = achieved HBM bytes/s,
    ``fixed_s`` = one kernel's fixed time. ``bytes_per_param`` overrides the format table (nested
    slices)."""
    if mode not in MODES:
        raise ValueError(f"dequant mode must be one of {MODES}, got {mode!r}")
    if mode == "free" or is_native(fmt, gpu.peak_tflops):
        return DequantCost(mode)
    family = "mwq" if fmt.startswith("mwq") else fmt
    ops = (ops_override or {}).get(fmt, (ops_override or {}).get(family, DEQUANT_OPS_PER_WEIGHT.get(family, 0.0)))
    alu = params * ops / (gpu.peak_tflops.fp32 * 1e12 * gpu.compute_efficiency)
    if mode == "fused":
        return DequantCost(mode, alu_s=alu)
    bpp = BYTES_PER_PARAM[fmt] if bytes_per_param is None else bytes_per_param
    pass_s = max(alu, params * (bpp + 2.0) / mem_bw) + fixed_s
    return DequantCost(mode, pass_s=pass_s, gemm_bytes_per_param=2.0, gemm_dtype="bf16")
