"""Write kiln_example/models/tiny-qwen2: a random, untrained Qwen2 of 46 KB that the package ships,
so that ``kiln convert_weight tiny-qwen2-example ...`` finds a model by name (see ``packaged_models``
in kiln_example/npz_source.py).  Its output is committed; run this again only to change the model."""

import json
from pathlib import Path

import numpy as np

CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}


def tensors(c: dict, rng) -> dict[str, np.ndarray]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head, c["num_key_value_heads"] * head
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    return {name: (np.ones(shape) if name.endswith("norm.weight") else rng.normal(0, 0.1, shape)).astype(np.float32)
            for name, shape in shapes.items()}


def main():
    out = Path(__file__).parent / "kiln_example" / "models" / "tiny-qwen2"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    np.savez(out / "weights.npz", **tensors(CONFIG, np.random.default_rng(0)))


if __name__ == "__main__":
    main()
