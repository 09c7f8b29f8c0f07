"""Attention tensor parallelism and the KV cache: KV heads are divided over the TP GPUs (at least
one head each, so beyond num_kv_heads GPUs heads are replicated); MLA's compressed latent is held
whole by every TP GPU. Memory checks and attention time follow that split."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.config.loader import scenario_from_dict
from moesim.engine.expert_parallel import check_fits
from moesim.models.presets import load_model_preset
from moesim.models.spec import ModelSpec
from moesim.perf.predictor import Predictor


def _model(name):
    return ModelSpec.model_validate(load_model_preset(name))


@pytest.mark.parametrize("name,tp,shards", [
    ("deepseek-v3", 1, 1), ("deepseek-v3", 2, 1), ("deepseek-v3", 8, 1),
    ("qwen3-30b-a3b", 2, 2), ("qwen3-30b-a3b", 4, 4), ("qwen3-30b-a3b", 8, 4),
    ("mixtral-8x7b", 8, 8), ("mixtral-8x7b", 16, 8),
])
def test_kv_shards_follow_the_kv_heads(name, tp, shards):
    m = _model(name)
    assert m.kv_tp_shards(tp) == shards
    if m.attention.kind != "mla":
        assert (m.attention.num_kv_heads or m.attention.num_heads) >= shards


def _ep(model, tp):
    return scenario_from_dict({
        "name": "kv-tp", "model": {"preset": model}, "hardware": {"preset": "h100-sxm-pcie5"},
        "cluster": {"preset": "dgx-h100", "nodes": 1}, "parallel": {"attention_tp": tp},
        "trace": {"synthetic": {"tokens": 64, "seed": 0}},
        "workload": {"batch_size": 4, "max_tokens": 32, "context_tokens": 1000},
        "runtime": {"launch_mode": "graph", "wait_for_router": False},
        "policies": {"cache": {"kind": "all_resident"}},
    })


@pytest.mark.parametrize("model", ["deepseek-v2-lite", "qwen3-30b-a3b"])
def test_memory_check_holds_the_rank_kv_split_over_its_shards(model):
    steps = 3
    for tp in (1, 2, 8):
        sc = _ep(model, tp)
        m, wl = sc.model, sc.workload
        mem = check_fits(sc, slots_per_gpu=m.num_experts // 8, steps=steps, source="t")
        rank_kv = wl.batch_size * tp * (wl.context_tokens + steps) * m.kv_bytes_per_token
        assert mem["kv_bytes"] == int(rank_kv / m.kv_tp_shards(tp))
        if m.attention.kind == "mla":
            assert mem["kv_bytes"] == int(rank_kv)  # every TP GPU holds the rank's whole latent cache


def test_attention_core_splits_flops_over_tp_and_kv_reads_over_shards():
    for name in ("deepseek-v2-lite", "qwen3-30b-a3b"):  # MLA, and GQA with 4 KV heads
        sc = _ep(name, 1)
        m = sc.model
        pred = Predictor(m, sc.hardware)
        ctx = np.array([128.0, 4096.0, 65536.0])
        B = 64
        flops = B * m.attention_core_flops(1) * ctx
        nbytes = B * m.kv_bytes_per_token_layer * ctx
        for tp in (1, 2, 4, 8):
            k = m.kv_tp_shards(tp)
            got, _ = pred.attention_core(B, ctx, flop_split=tp, kv_split=k)
            want = np.maximum(flops / tp / pred.flops_dense, nbytes / k / pred.mem_bw)
            np.testing.assert_allclose(got, want, rtol=1e-12)
        one, _ = pred.attention_core(B, ctx)
        np.testing.assert_allclose(one, np.maximum(flops / pred.flops_dense, nbytes / pred.mem_bw), rtol=1e-12)
