"""Decoder shapes of the models the lab prices, from their published `config.json` files.

Field names follow the Hugging Face configs where one exists (in parentheses below).
- layers (num_hidden_layers), hidden (hidden_size), heads (num_attention_heads),
  kv_heads (num_key_value_heads), head_dim, vocab (vocab_size).
- ffn (intermediate_size): the SwiGLU width of a dense MLP layer.
- experts (num_local_experts / num_experts / n_routed_experts), top_k (num_experts_per_tok),
  moe_ffn (moe_intermediate_size; Mixtral's experts use intermediate_size), shared_experts
  (n_shared_experts), dense_layers (first_k_dense_replace: leading layers with a dense MLP).
- MLA (DeepSeek-V3 only): q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim.
  Its KV cache holds kv_lora_rank + qk_rope_head_dim values per token per layer, shared by all heads.
- tied_embeddings: whether lm_head reuses the embedding matrix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    source: str
    experts: int = 0
    top_k: int = 0
    moe_ffn: int = 0
    shared_experts: int = 0
    dense_layers: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    tied_embeddings: bool = False

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.is_moe else 0

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Attention projections of one layer as (in, out) = [K, N] matmul shapes."""
        h, d = self.hidden, self.head_dim
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            return {
                "q_a": (h, self.q_lora_rank),
                "q_b": (self.q_lora_rank, self.heads * qk),
                "kv_a": (h, self.kv_lora_rank + self.qk_rope_head_dim),
                "kv_b": (self.kv_lora_rank, self.heads * (self.qk_nope_head_dim + self.v_head_dim)),
                "o": (self.heads * self.v_head_dim, h),
            }
        return {"qkv": (h, (self.heads + 2 * self.kv_heads) * d), "o": (self.heads * d, h)}

    def params(self) -> int:
        """Total parameter count (norms excluded: they are negligible)."""
        attn = sum(k * n for k, n in self.linear_shapes().values())
        mlp_dense = 3 * self.hidden * self.ffn
        moe = (
            self.experts + self.shared_experts
        ) * 3 * self.hidden * self.moe_ffn + self.hidden * self.experts
        dense_layers = self.layers - self.moe_layers
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * attn + dense_layers * mlp_dense + self.moe_layers * moe + embed


_MODELS = (
    ModelShape(
        name="llama-3-8b",
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        head_dim=128,
        ffn=14336,
        vocab=128256,
        source="meta-llama/Meta-Llama-3-8B config.json",
    ),
    ModelShape(
        name="llama-3-70b",
        layers=80,
        hidden=8192,
        heads=64,
        kv_heads=8,
        head_dim=128,
        ffn=28672,
        vocab=128256,
        source="meta-llama/Meta-Llama-3-70B config.json",
    ),
    ModelShape(
        name="mixtral-8x7b",
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        head_dim=128,
        ffn=14336,
        vocab=32000,
        experts=8,
        top_k=2,
        moe_ffn=14336,
        source="mistralai/Mixtral-8x7B-v0.1 config.json (num_local_experts=8, num_experts_per_tok=2)",
    ),
    ModelShape(
        name="qwen3-30b-a3b",
        layers=48,
        hidden=2048,
        heads=32,
        kv_heads=4,
        head_dim=128,
        ffn=6144,
        vocab=151936,
        experts=128,
        top_k=8,
        moe_ffn=768,
        source="Qwen/Qwen3-30B-A3B config.json (every layer sparse: decoder_sparse_step=1)",
    ),
    ModelShape(
        name="deepseek-v3",
        layers=61,
        hidden=7168,
        heads=128,
        kv_heads=128,
        head_dim=192,
        ffn=18432,
        vocab=129280,
        experts=256,
        top_k=8,
        moe_ffn=2048,
        shared_experts=1,
        dense_layers=3,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        source="deepseek-ai/DeepSeek-V3 config.json (MLA; first_k_dense_replace=3; n_group=8, topk_group=4)",
    ),
)

MODELS: Mapping[str, ModelShape] = MappingProxyType({m.name: m for m in _MODELS})


def get_model(name: str) -> ModelShape:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name]
