"""Llama-family logits against transformers, float32, on small random checkpoints.

Each class is one Hugging Face configuration; the checks come from kiln's architecture
contract (whole prompts, chunked prefill, decode steps, two sequences batched, greedy).
"""

from kiln.testing.contracts import ArchitectureContract

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


class TestGroupedQueryAttention(ArchitectureContract):
    hf_config = BASE


class TestTiedEmbeddingsMultiHead(ArchitectureContract):
    hf_config = {**BASE, "num_key_value_heads": 4, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}


class TestLlama3RopeScaling(ArchitectureContract):
    hf_config = {
        **BASE,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    }


class TestLinearRopeScalingExplicitHeadDim(ArchitectureContract):
    hf_config = {**BASE, "head_dim": 32, "rope_theta": 1000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}


class TestShardedSafetensors(ArchitectureContract):
    hf_config = {**BASE, "num_hidden_layers": 3}
    max_shard_size = "40KB"


class TestPytorchBin(ArchitectureContract):
    hf_config = BASE
    checkpoint_format = "torch"


class TestMistral(ArchitectureContract):
    hf_config = {**BASE, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None}
