"""Reading llama.cpp's ``llama`` GGUF files: their metadata as a Hugging Face config, their
tensor names as Hugging Face names (no TVM import).

llama.cpp's converter stores the rows of ``attn_q`` and ``attn_k`` in another order: within each
head it interleaves the two halves that Hugging Face's rotary embedding pairs up (``i`` with
``i + head_dim/2``), so that pairs sit next to each other (GPT-J style).  :func:`unpermute_rows`
undoes that; everything else is a rename.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import numpy as np

from kiln.errors import ConfigError
from kiln.sources.gguf import GGUFMapping, GGUFMetadata, GGUFTensor

GGUF_ARCHITECTURES = ("llama",)

# GGUF name inside a block -> Hugging Face name inside model.layers.N
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, rows ``[a0, b0, a1, b1, ...]`` back to
    ``[a0, a1, ..., b0, b1, ...]`` (works for weights ``[rows, in]`` and biases ``[rows]``)."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of rotary pairs")
    half = rows // n_heads // 2
    split = weight.reshape(n_heads, half, 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weight.shape))


def _rope_scaling(metadata: GGUFMetadata, arch: str) -> dict | None:
    """Hugging Face ``rope_scaling`` from ``rope.scaling.*`` (or the older ``rope.scale_linear``)."""
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind is None:
        legacy = metadata.get(f"{arch}.rope.scale_linear")
        return {"rope_type": "linear", "factor": float(legacy)} if legacy and float(legacy) != 1.0 else None
    if kind == "none":
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(metadata.get(f"{arch}.rope.scaling.factor", 1.0))}
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def gguf_map(metadata: GGUFMetadata, tensors: Mapping[str, tuple[int, ...]]) -> GGUFMapping | None:
    """Hugging Face ``LlamaForCausalLM`` config and tensor names for a ``llama`` GGUF file.

    ``metadata`` is the file's :class:`kiln.sources.gguf.GGUFMetadata`; ``tensors`` maps GGUF
    tensor names to their (numpy-order) shapes.  Returns ``None`` for other architectures.
    """
    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        return None

    def need(key: str) -> Any:
        return metadata.require(f"{arch}.{key}")

    layers = int(need("block_count"))
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(metadata.get(f"{arch}.attention.key_length", hidden // heads if heads else 0))
    rotary = int(metadata.get(f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ConfigError(
            f"GGUF file '{metadata.path}' rotates {rotary} of {head_dim} dimensions per head; kiln-llama supports "
            "only full rotary embeddings"
        )
    if "rope_freqs.weight" in tensors:
        raise ConfigError(
            f"GGUF file '{metadata.path}' stores per-frequency rope factors (rope_freqs.weight, Llama 3.1-style "
            "scaling), which kiln cannot read from GGUF yet; convert the model from its Hugging Face checkpoint"
        )
    vocab = metadata.get(f"{arch}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in metadata:
        vocab = len(metadata["tokenizer.ggml.tokens"])
    if vocab is None and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"][0]
    if vocab is None:
        raise ConfigError(
            f"GGUF file '{metadata.path}' gives no vocabulary size ({arch}.vocab_size or tokenizer.ggml.tokens)"
        )

    tied = "output.weight" not in tensors
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(metadata.get(f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_gate.bias" in tensors,
    }
    scaling = _rope_scaling(metadata, arch)
    if scaling is not None:
        config["rope_scaling"] = scaling

    names: dict[str, str | GGUFTensor] = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if not tied:
        names["lm_head.weight"] = "output.weight"
    q_heads, k_heads = partial(unpermute_rows, n_heads=heads), partial(unpermute_rows, n_heads=kv_heads)
    for i in range(layers):
        for gguf_name, hf_name in BLOCK_TENSORS.items():
            for kind in ("weight", "bias"):
                src = f"blk.{i}.{gguf_name}.{kind}"
                transform = q_heads if gguf_name == "attn_q" else k_heads if gguf_name == "attn_k" else None
                names[f"model.layers.{i}.{hf_name}.{kind}"] = GGUFTensor(src, transform)
    return GGUFMapping(config, names)
