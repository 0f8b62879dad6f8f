"""kiln's built-in model sources, registered through the ordinary hook."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..specs import ModelSourceSpec
from . import gguf
from . import huggingface as hf


@hookimpl
def register_model_sources():
    return [
        ModelSourceSpec(
            name="huggingface-safetensors",
            detect=hf.detect_safetensors,
            open=hf.SafetensorsCheckpoint,
            priority=20,
            description="Hugging Face checkpoint directory with model.safetensors (single or sharded)",
        ),
        ModelSourceSpec(
            name="huggingface-torch",
            detect=hf.detect_torch,
            open=hf.TorchCheckpoint,
            priority=10,
            description="Hugging Face checkpoint directory with pytorch_model.bin (needs torch)",
        ),
        ModelSourceSpec(
            name="gguf",
            detect=gguf.detect,
            open=gguf.GGUFCheckpoint,
            priority=30,
            packaged_models=gguf.packaged_models,
            description="llama.cpp GGUF file (F32/F16/BF16, Q4_0..Q8_0, Q4_K/Q5_K/Q6_K), or a directory holding one",
        ),
    ]
