"""kiln's built-in model sources, registered through the ordinary hook."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..specs import ModelSourceSpec
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
    ]
