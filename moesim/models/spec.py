"""MoE model description and the quantities the simulator derives from it.

A model is a stack of ``num_layers`` transformer blocks. Each block has attention and either a
routed MoE FFN (with optional shared experts) or a dense FFN. Bytes are per the model's ``dtype``
(``expert_dtype`` may differ: quantised experts; ``embedding_dtype`` and ``kv_dtype`` may differ
too, as in FP8 checkpoints that keep embeddings and the KV cache in BF16). FLOPs count one
multiply-add as 2 FLOPs. Parameter counts leave out norms, biases and other vectors (well under
0.1% of any preset).

A spec is a value: derived quantities are computed once and cached. Assigning a field clears the
cache, and ``model_copy(update=...)`` re-validates, so both give consistent derived quantities;
the nested :class:`AttentionSpec` is frozen.
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from moesim.config.base import StrictModel

# Bytes per parameter, block scales included. The GGUF block formats' bits per weight are those of
# llama.cpp's ggml quantisation (Q8_0 and Q4_0: 32 weights + one fp16 scale; the k-quants: 256-weight
# super-blocks with 6- or 8-bit sub-block scales): Q8_0 8.5, Q6_K 6.5625, Q5_K 5.5, Q4_K 4.5, Q4_0 4.5,
# Q3_K 3.4375, Q2_K 2.5625 bits per weight. Plain int8/int4/fp8 carry no scales here.
# HQQ (Badri & Shaji 2023, the `hqq` library) at group size 64 with an fp16 scale and an fp16 zero per
# group adds 32 / 64 = 0.5 bits per weight: 2-bit packs four values per byte (2.5 bits in all), 3-bit
# packs ten values per int32 (3.2 bits, then 3.7 in all). Ternary weights in {-1, 0, 1} (BitNet b1.58,
# MoTE) as llama.cpp stores them: TQ2_0 2 bits per weight + one fp16 scale per 256 (2.0625 bits),
# TQ1_0 five trits per byte + one fp16 scale per 256 (1.6875 bits).
BYTES_PER_PARAM = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
    "q8_0": 8.5 / 8,
    "q6_k": 6.5625 / 8,
    "q5_k": 5.5 / 8,
    "q4_k": 4.5 / 8,
    "q4_0": 4.5 / 8,
    "q3_k": 3.4375 / 8,
    "q2_k": 2.5625 / 8,
    "hqq3": 3.7 / 8,
    "hqq2": 2.5 / 8,
    "tq2_0": 2.0625 / 8,
    "tq1_0": 1.6875 / 8,
}
Dtype = Literal[
    "fp32", "bf16", "fp16", "fp8", "int8", "int4", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0", "q3_k", "q2_k",
    "hqq3", "hqq2", "tq2_0", "tq1_0",
]


class AttentionSpec(StrictModel):
    """Attention shape: ``mha``/``gqa`` (num_kv_heads < num_heads) or DeepSeek's ``mla``.

    Frozen: the enclosing :class:`ModelSpec` caches quantities derived from it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["mha", "gqa", "mla"] = "gqa"
    num_heads: int = Field(ge=1)
    num_kv_heads: int | None = Field(default=None, ge=1, description="mha/gqa; default num_heads")
    head_dim: int | None = Field(default=None, ge=1, description="mha/gqa; default hidden/heads")
    # MLA (DeepSeek-V2/V3): low-rank compressed KV
    q_lora_rank: int | None = Field(default=None, ge=1, description="mla; None = no q compression")
    kv_lora_rank: int | None = Field(default=None, ge=1)
    qk_nope_head_dim: int | None = Field(default=None, ge=1)
    qk_rope_head_dim: int | None = Field(default=None, ge=1)
    v_head_dim: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "mla":
            missing = [
                n
                for n in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
                if getattr(self, n) is None
            ]
            if missing:
                raise ValueError(f"kind 'mla' needs {', '.join(missing)}")
        elif self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        return self


class ModelSpec(StrictModel):
    """An MoE transformer: layer structure, expert and attention shapes, dtype."""

    name: str
    family: str = ""
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    num_experts: int = Field(ge=1, description="routed experts per MoE layer")
    top_k: int = Field(ge=1, description="routed experts per token")
    moe_intermediate_size: int = Field(ge=1, description="FFN width of one routed expert")
    num_shared_experts: int = Field(default=0, ge=0)
    shared_expert_intermediate_size: int | None = Field(
        default=None, ge=1, description="width of each shared expert; default moe_intermediate_size"
    )
    dense_intermediate_size: int | None = Field(
        default=None, ge=1, description="FFN width of the dense (non-MoE) blocks"
    )
    first_dense_layers: int = Field(default=0, ge=0, description="leading blocks with a dense FFN")
    moe_layer_interval: int = Field(default=1, ge=1, description="every n-th block is MoE")
    moe_layer_offset: int = Field(default=0, ge=0, description="first MoE block index mod interval")
    ffn_gated: bool = Field(default=True, description="SwiGLU (3 matrices) vs plain FFN (2)")
    attention: AttentionSpec
    dtype: Dtype = "bf16"
    expert_dtype: Dtype | None = Field(default=None, description="routed experts; default dtype")
    embedding_dtype: Dtype | None = Field(
        default=None, description="embedding table and LM head; default dtype"
    )
    kv_dtype: Dtype | None = Field(default=None, description="KV-cache elements; default dtype")
    tie_embeddings: bool = False
    expert_size_multipliers: list[float] | None = Field(
        default=None,
        description="heterogeneous experts (HMoE): FFN width of expert e over moe_intermediate_size, one per "
        "expert, the same at every MoE layer; None = all experts equal",
    )
    source: str = Field(default="", description="where the numbers come from (config URL)")

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if not self.moe_layers:
            raise ValueError("no MoE layer: check first_dense_layers / moe_layer_interval")
        m = self.expert_size_multipliers
        if m is not None:
            if len(m) != self.num_experts:
                raise ValueError(f"expert_size_multipliers has {len(m)} entries, num_experts is {self.num_experts}")
            if any(not (x > 0 and x < float("inf")) for x in m):
                raise ValueError("expert_size_multipliers must be positive and finite")
        return self

    # ----- value semantics ---------------------------------------------------------------------
    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in type(self).model_fields:
            self._clear_derived()

    def _clear_derived(self) -> None:
        for k in _CACHED:
            self.__dict__.pop(k, None)

    def model_copy(self, *, update=None, deep: bool = False):
        """A copy; with ``update`` the merged fields are validated anew (pydantic's own
        ``model_copy`` skips validation and would carry stale derived quantities over)."""
        if update:
            data = self.model_dump()
            data.update(update)
            return type(self).model_validate(data)
        return super().model_copy(deep=deep)

    # ----- layer structure -------------------------------------------------------------------
    @cached_property
    def moe_layers(self) -> tuple[int, ...]:
        """Model block indices that have a routed MoE FFN, in order."""
        step = self.moe_layer_interval
        first = self.moe_layer_offset % step
        return tuple(
            i for i in range(self.num_layers) if i >= self.first_dense_layers and i % step == first
        )

    # ----- bytes ---------------------------------------------------------------------------------
    @property
    def bytes_per_param(self) -> float:
        """Bytes of one dense (non-expert) parameter."""
        return BYTES_PER_PARAM[self.dtype]

    @property
    def expert_bytes_per_param(self) -> float:
        """Bytes of one routed-expert parameter."""
        return BYTES_PER_PARAM[self.expert_dtype or self.dtype]

    @property
    def embedding_bytes_per_param(self) -> float:
        """Bytes of one embedding-table or LM-head parameter."""
        return BYTES_PER_PARAM[self.embedding_dtype or self.dtype]

    @property
    def kv_bytes_per_element(self) -> float:
        """Bytes of one KV-cache element."""
        return BYTES_PER_PARAM[self.kv_dtype or self.dtype]

    @property
    def _ffn_mats(self) -> int:
        return 3 if self.ffn_gated else 2

    @cached_property
    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return self._ffn_mats * self.hidden_size * self.moe_intermediate_size

    @cached_property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights (what one load moves)."""
        return int(round(self.expert_params * self.expert_bytes_per_param))

    def expert_flops(self, tokens: int | float = 1) -> float:
        """FLOPs of one routed expert applied to ``tokens`` tokens."""
        return 2.0 * self.expert_params * tokens

    @cached_property
    def shared_expert_params(self) -> int:
        """Parameters of all shared experts of one MoE block together."""
        f = self.shared_expert_intermediate_size or self.moe_intermediate_size
        return self.num_shared_experts * self._ffn_mats * self.hidden_size * f

    @cached_property
    def dense_ffn_params(self) -> int:
        """Parameters of the FFN of one dense (non-MoE) block."""
        f = self.dense_intermediate_size or self.moe_intermediate_size
        return self._ffn_mats * self.hidden_size * f

    @cached_property
    def router_params(self) -> int:
        """Parameters of one MoE block's router (gate)."""
        return self.hidden_size * self.num_experts

    @cached_property
    def attention_params(self) -> int:
        """Parameters of one block's attention projections."""
        a, h = self.attention, self.hidden_size
        if a.kind == "mla":
            qk = a.qk_nope_head_dim + a.qk_rope_head_dim
            if a.q_lora_rank is None:  # direct query projection (DeepSeek-V2-Lite)
                q = h * a.num_heads * qk
            else:  # down-projection to q_lora_rank, then up to the heads
                q = h * a.q_lora_rank + a.q_lora_rank * a.num_heads * qk
            # joint KV down-projection (latent + shared rope key), then K (nope part) and V up
            kv = h * (a.kv_lora_rank + a.qk_rope_head_dim)
            kv += a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
            o = a.num_heads * a.v_head_dim * h
            return q + kv + o
        hd = a.head_dim or h // a.num_heads
        kvh = a.num_kv_heads or a.num_heads
        return h * a.num_heads * hd * 2 + h * kvh * hd * 2

    @cached_property
    def kv_bytes_per_token_layer(self) -> int:
        """KV-cache bytes one token adds in one block (MLA: the compressed latent + rope key)."""
        a = self.attention
        if a.kind == "mla":
            return int((a.kv_lora_rank + a.qk_rope_head_dim) * self.kv_bytes_per_element)
        hd = a.head_dim or self.hidden_size // a.num_heads
        kvh = a.num_kv_heads or a.num_heads
        return int(2 * kvh * hd * self.kv_bytes_per_element)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token adds over all blocks."""
        return self.kv_bytes_per_token_layer * self.num_layers

    def kv_tp_shards(self, tp: int) -> int:
        """Over how many of ``tp`` tensor-parallel attention GPUs the KV cache is split: the KV
        heads are divided among them (a GPU holds at least one head, so beyond ``num_kv_heads``
        GPUs heads are replicated); MLA's compressed latent is not per head, so every TP GPU holds
        all of it (its query heads split, its cache replicated)."""
        a = self.attention
        if a.kind == "mla":
            return 1
        return max(1, min(int(tp), a.num_kv_heads or a.num_heads))

    def attention_core_flops(self, context_tokens: int) -> float:
        """FLOPs of score and value products of one token against ``context_tokens`` keys."""
        a = self.attention
        if a.kind == "mla":  # absorbed form: scores and values in the latent space
            d_qk = a.kv_lora_rank + a.qk_rope_head_dim
            return 2.0 * a.num_heads * (d_qk + a.kv_lora_rank) * context_tokens
        hd = a.head_dim or self.hidden_size // a.num_heads
        return 4.0 * a.num_heads * hd * context_tokens

    def block_dense_params(self, layer: int) -> int:
        """Parameters of block ``layer`` that always run on the GPU (all but routed experts)."""
        p = self.attention_params
        if layer in self._moe_set:
            p += self.router_params + self.shared_expert_params
        else:
            p += self.dense_ffn_params
        return p

    @cached_property
    def _moe_set(self) -> frozenset:
        return frozenset(self.moe_layers)

    @cached_property
    def embedding_params(self) -> int:
        """Embedding plus LM-head parameters."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    @cached_property
    def blocks_dense_params(self) -> int:
        """Parameters of all blocks that are not routed experts (no embedding or LM head)."""
        return sum(self.block_dense_params(i) for i in range(self.num_layers))

    @cached_property
    def dense_bytes(self) -> int:
        """Bytes of every weight that is not a routed expert (always resident on the GPU)."""
        return int(
            round(
                self.blocks_dense_params * self.bytes_per_param
                + self.embedding_params * self.embedding_bytes_per_param
            )
        )

    @cached_property
    def total_expert_bytes(self) -> int:
        """Bytes of all routed experts of all MoE blocks (with ``expert_size_multipliers``, expert
        ``e`` takes ``round(multiplier[e] * expert_bytes)``)."""
        if self.expert_size_multipliers is not None:
            per_layer = sum(int(round(x * self.expert_bytes)) for x in self.expert_size_multipliers)
            return per_layer * len(self.moe_layers)
        return self.expert_bytes * self.num_experts * len(self.moe_layers)

    @cached_property
    def total_params(self) -> int:
        """All parameters (dense + routed experts; heterogeneous experts by their multipliers)."""
        dense = self.blocks_dense_params + self.embedding_params
        if self.expert_size_multipliers is not None:
            per_layer = sum(int(round(x * self.expert_params)) for x in self.expert_size_multipliers)
            return dense + per_layer * len(self.moe_layers)
        return dense + self.expert_params * self.num_experts * len(self.moe_layers)

    @cached_property
    def active_params(self) -> int:
        """Parameters used per token: all non-expert weights (embedding table and LM head
        included) plus ``top_k`` routed experts per MoE block."""
        dense = self.blocks_dense_params + self.embedding_params
        return dense + self.expert_params * self.top_k * len(self.moe_layers)


_CACHED = tuple(n for n, v in vars(ModelSpec).items() if isinstance(v, cached_property))
