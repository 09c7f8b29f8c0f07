"""Synthetic routing at DeepSeek-V3 size (256 experts, top-8): the plain generator for all 58 MoE
layers, and the fitted generator for a 256-expert profile. Both must stay byte-identical to the
implementation they replaced (tests/traces/test_synthetic_speed_equivalence.py checks that on
random configurations); here a checksum of the output pins the figures measured.

Run: ``pytest benchmarks/test_synthetic_speed.py`` (``--benchmark-disable`` runs each once, as CI does).
"""

from __future__ import annotations

import hashlib
import time

import pytest

from moesim.traces import fit_profile, synthesize, synthesize_from_profile

LIMIT_S = 30.0
ROWS = 16_384


def _digest(tr) -> str:
    return hashlib.sha256(tr.experts.tobytes() + tr.weights.tobytes()).hexdigest()


def _timed(benchmark, fn):
    walls = []

    def run():
        t0 = time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t0)
        return out

    out = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["wall_s"] = min(walls)
    assert min(walls) < LIMIT_S
    return out


def test_synthesize_deepseek_v3_16k_rows(benchmark):
    tr = _timed(benchmark, lambda: synthesize(num_tokens=ROWS, layers=list(range(3, 61)), num_experts=256,
                                              top_k=8, zipf_s=0.8, reuse_prob=0.1, seed=0))
    assert tr.experts.shape == (ROWS, 58, 8) and tr.weights.shape == (ROWS, 58, 8)
    assert _digest(tr) == "17922782370f6f0a43967681468fae8a8fa55d9726afcc8ae77999ee8e3dd4ec"


@pytest.fixture(scope="module")
def profile_256():
    src = synthesize(num_tokens=4096, layers=list(range(8)), num_experts=256, top_k=8, zipf_s=0.8,
                     reuse_prob=0.3, seed=1)
    return fit_profile(src, calibrate=False)


def test_synthesize_from_profile_256_experts_16k_rows(benchmark, profile_256):
    tr = _timed(benchmark, lambda: synthesize_from_profile(profile_256, num_tokens=ROWS, seed=0))
    assert tr.experts.shape == (ROWS, 8, 8)
    assert _digest(tr) == "86dcb753e8a6e855176e377ff790d9a275c8cb8ba2165a54b5a390e15f2d5b23"
