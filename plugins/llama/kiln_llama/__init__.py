"""kiln-llama: the Llama family for kiln (LlamaForCausalLM, MistralForCausalLM)."""

from kiln import hookimpl
from kiln.specs import ArchitectureSpec

from .config import LlamaConfig, weight_map
from .gguf import gguf_map

__version__ = "0.1.0"


def _build_model(config: LlamaConfig):
    from .model import LlamaForCausalLM  # imports TVM: only when a model is built

    return LlamaForCausalLM(config)


@hookimpl
def register_architectures():
    return [
        ArchitectureSpec(
            name="llama",
            hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
            hf_model_types=("llama", "mistral"),
            config_class=LlamaConfig,
            model_factory=_build_model,
            weight_map=weight_map,
            gguf_map=gguf_map,
            default_conv_template="llama-2",
            package="kiln-llama",
            # Mistral's sliding window is not implemented: the context window is capped to it instead
            sliding_window_attention=False,
        )
    ]
