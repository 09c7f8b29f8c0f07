"""Derived quantities of ModelSpec: bytes, KV, layer structure, and consistency under overrides."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from moesim.config.loader import apply_overrides, deep_merge, expand_presets
from moesim.models import ModelSpec, load_model_preset


def spec(name: str, **over) -> ModelSpec:
    return ModelSpec.model_validate(deep_merge(load_model_preset(name), over))


def test_mixtral_expert_bytes_exact():
    # 3 matrices x 4096 x 14336 x 2 bytes (bf16)
    m = spec("mixtral-8x7b")
    assert m.expert_params == 3 * 4096 * 14336
    assert m.expert_bytes == 352_321_536
    assert m.total_expert_bytes == 352_321_536 * 8 * 32


def test_expert_dtype_override_halves_expert_bytes_only():
    m = spec("mixtral-8x7b", expert_dtype="fp8")
    assert m.expert_bytes == 352_321_536 // 2
    assert m.dense_bytes == spec("mixtral-8x7b").dense_bytes


def test_kv_bytes_per_token_layer():
    # GQA: 8 KV heads x 128 x (K and V) x 2 bytes
    assert spec("mixtral-8x7b").kv_bytes_per_token_layer == 8 * 128 * 2 * 2 == 4096
    # MLA: compressed latent 512 + rope key 64, bf16 (the FP8 checkpoint keeps a BF16 KV cache)
    v3 = spec("deepseek-v3")
    assert v3.kv_bytes_per_token_layer == (512 + 64) * 2 == 1152
    assert v3.kv_bytes_per_token == 1152 * 61
    assert spec("mixtral-8x7b", kv_dtype="fp8").kv_bytes_per_token_layer == 2048


def test_deepseek_v3_bytes_follow_the_fp8_checkpoint():
    v3 = spec("deepseek-v3")
    assert v3.expert_bytes == 3 * 7168 * 2048  # fp8: one byte per parameter
    emb = 2 * 129280 * 7168
    assert v3.embedding_params == emb
    assert v3.dense_bytes == v3.blocks_dense_params * 1 + emb * 2
    bf16 = spec("deepseek-v3", dtype="bf16")
    assert bf16.expert_bytes == 2 * v3.expert_bytes
    assert bf16.dense_bytes == 2 * (v3.blocks_dense_params + emb)


def test_moe_layers_and_validation():
    assert spec("deepseek-v3").moe_layers == tuple(range(3, 61))
    assert spec("switch-base-8").moe_layers == (1, 3, 5, 7, 9, 11)
    with pytest.raises(ValidationError, match="top_k"):
        spec("mixtral-8x7b", top_k=9)
    with pytest.raises(ValidationError, match="no MoE layer"):
        spec("deepseek-v3", num_layers=3)
    with pytest.raises(ValidationError):
        spec("mixtral-8x7b", num_expert=8)  # misspelt key: extra=forbid


def test_scenario_override_path_changes_derived_totals():
    """`--set model.num_layers=4` on a preset gives the totals of a 4-block model."""
    raw = apply_overrides({"model": {"preset": "mixtral-8x7b"}}, ["model.num_layers=4"])
    m4 = ModelSpec.model_validate(expand_presets(raw, "<test>")["model"])
    m32 = spec("mixtral-8x7b")
    assert m4.num_layers == 4 and m4.moe_layers == (0, 1, 2, 3)
    per_block = (m32.total_params - m32.embedding_params) // 32
    assert m4.total_params == m32.embedding_params + 4 * per_block
    assert m4.total_expert_bytes == m32.total_expert_bytes // 8
    assert m4.kv_bytes_per_token == 4 * 4096


def test_model_copy_and_assignment_keep_derived_quantities_consistent():
    m = spec("mixtral-8x7b")
    before = m.total_params  # caches the derived value
    c = m.model_copy(update={"num_layers": 4})
    assert c.moe_layers == (0, 1, 2, 3)
    assert c.total_params == spec("mixtral-8x7b", num_layers=4).total_params
    assert m.total_params == before  # the original is untouched
    m.num_layers = 4
    assert m.total_params == c.total_params and m.moe_layers == (0, 1, 2, 3)
    with pytest.raises(ValidationError):
        m.attention.num_kv_heads = 4  # frozen: the parent caches values derived from it


LINEAR = [
    "mixtral-8x7b",
    "mixtral-8x22b",
    "olmoe-1b-7b",
    "phi-3.5-moe",
    "qwen1.5-moe-a2.7b",
    "qwen3-30b-a3b",
]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(LINEAR), n=st.integers(min_value=1, max_value=128))
def test_total_params_linear_in_moe_layers(name, n):
    """Without dense leading blocks and with every block MoE, changing only num_layers changes
    every total by a fixed amount per (MoE) block."""
    base = spec(name)
    m = spec(name, num_layers=n)
    assert len(m.moe_layers) == n
    per_block_total = (base.total_params - base.embedding_params) // base.num_layers
    per_block_active = (base.active_params - base.embedding_params) // base.num_layers
    assert m.total_params == base.embedding_params + n * per_block_total
    assert m.active_params == base.embedding_params + n * per_block_active
    assert m.total_expert_bytes == n * base.num_experts * base.expert_bytes
    assert m.kv_bytes_per_token == n * base.kv_bytes_per_token_layer
    assert m.expert_bytes == base.expert_bytes


@settings(max_examples=30, deadline=None)
@given(n=st.integers(min_value=2, max_value=40))
def test_switch_counts_follow_the_interleaving(n):
    """Switch: odd blocks are MoE, even blocks dense; totals add up block by block."""
    m = spec("switch-base-8", num_layers=n)
    moe = n // 2
    assert m.moe_layers == tuple(range(1, n, 2))
    d, f, e = 768, 3072, 8
    block_attn = 4 * d * d
    dense_ffn, moe_ffn = 2 * d * f, e * 2 * d * f + d * e  # ReLU FFN; MoE adds the router
    expect = m.embedding_params + n * block_attn + (n - moe) * dense_ffn + moe * moe_ffn
    assert m.total_params == expect


def test_gguf_block_formats_carry_their_scales():
    from moesim.models.presets import load_model_preset
    from moesim.models.spec import ModelSpec

    base = load_model_preset("mixtral-8x7b")
    params = 3 * 4096 * 14336
    for fmt, bpw in {"q8_0": 8.5, "q4_k": 4.5, "q2_k": 2.5625, "int4": 4.0}.items():
        m = ModelSpec.model_validate({**base, "expert_dtype": fmt})
        assert m.expert_bytes == round(params * bpw / 8)
