"""Qwen2 in tvm.relax.frontend.nn: Llama's structure with biases on q, k and v."""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from kiln.modeling import CausalLM, Embedding, Linear

from .config import Qwen2Config


class Qwen2Attention(nn.Module):
    def __init__(self, c: Qwen2Config):
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.qkv_proj = Linear(c.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=True)
        self.o_proj = Linear(self.heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x: Tensor, kv, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x), (b, s, self.heads + 2 * self.kv_heads, self.head_dim))
        out = kv.attention_with_fused_qkv(layer_id, qkv, self.heads, sm_scale=self.head_dim**-0.5)
        return self.o_proj(op.reshape(out, (b, s, self.heads * self.head_dim)))


class Qwen2MLP(nn.Module):
    def __init__(self, c: Qwen2Config):
        self.gate_up_proj = Linear(c.hidden_size, 2 * c.intermediate_size)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, c: Qwen2Config):
        self.self_attn = Qwen2Attention(c)
        self.mlp = Qwen2MLP(c)
        self.input_layernorm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False)

    def forward(self, h: Tensor, kv, layer_id: int) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), kv, layer_id)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    def __init__(self, c: Qwen2Config):
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([Qwen2DecoderLayer(c) for _ in range(c.num_hidden_layers)])
        self.norm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False)


class Qwen2ForCausalLM(CausalLM):
    def __init__(self, config: Qwen2Config):
        self.config = config
        self.model = Qwen2Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def body(self, h: Tensor, paged_kv_cache) -> Tensor:
        for layer_id, layer in enumerate(self.model.layers):
            h = layer(h, paged_kv_cache, layer_id)
        return self.model.norm(h)

    def get_logits(self, hidden: Tensor) -> Tensor:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.lm_head_forward(hidden)
        return self.lm_head(hidden)
