"""kiln-example-plugin: one plugin, every hook (see docs/writing-an-architecture-plugin.md)."""

from __future__ import annotations

from kiln import hookimpl
from kiln.quantization import GroupQuant
from kiln.specs import (
    ArchitectureSpec,
    BackendSpec,
    ConvTemplateSpec,
    ModelSourceSpec,
    QuantizationSpec,
)

from .config import Qwen2Config, weight_map

__version__ = "0.1.0"


def _build_model(config: Qwen2Config):
    from .model import Qwen2ForCausalLM  # TVM is imported only when a model is built

    return Qwen2ForCausalLM(config)


@hookimpl
def register_architectures():
    return [
        ArchitectureSpec(
            name="qwen2",
            hf_architectures=("Qwen2ForCausalLM",),
            hf_model_types=("qwen2",),
            config_class=Qwen2Config,
            model_factory=_build_model,
            weight_map=weight_map,
            default_conv_template="chatml",
            package="kiln-example-plugin",
        )
    ]


@hookimpl
def register_quantizations():
    # a new scheme is data: the core's group quantization with other parameters
    return [
        QuantizationSpec(
            "q8f32_1",
            GroupQuant(bits=8, group_size=32, model_dtype="float32", scale_dtype="float32"),
            "8-bit weights in groups of 32, float32 scales and compute",
        )
    ]


def _portable_target(opts):
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}  # no -mcpu: runs on any x86-64


def _default_tvm_pipeline(target, opts):
    from tvm import relax

    return relax.get_default_pipeline(target)  # TVM's own CPU pipeline, without kiln's schedules


@hookimpl
def register_backends():
    return [
        BackendSpec(
            name="cpu-portable",
            device_type="cpu",
            target=_portable_target,
            pipeline=_default_tvm_pipeline,
            is_available=lambda: True,
            description="baseline x86-64 code with TVM's default pipeline (portable, slow)",
        )
    ]


@hookimpl
def register_conv_templates():
    return [
        ConvTemplateSpec(
            name="example-chat",
            system_template="### System\n{system_message}\n",
            system_message="You answer briefly.",
            roles={"user": "### User", "assistant": "### Assistant"},
            seps=("\n",),
            role_content_sep="\n",
            role_empty_sep="\n",
            stop_str=("### User",),
        )
    ]


@hookimpl
def register_model_sources():
    from .npz_source import NpzCheckpoint, detect, packaged_models

    return [ModelSourceSpec(name="npz", detect=detect, open=NpzCheckpoint, priority=5,
                            packaged_models=packaged_models,  # names of the models this package ships
                            description="config.json + weights.npz (Hugging Face tensor names)")]


@hookimpl
def register_commands(app):
    import typer

    @app.command("example-info")
    def example_info():
        """Show what kiln-example-plugin provides."""
        typer.echo("kiln-example-plugin: architecture qwen2, device cpu-portable, quantization q8f32_1, "
                   "template example-chat, source npz")


@hookimpl
def resolve_architecture(hf_config):
    # fine-tuning tools that rename the model type still produce a Qwen2 model
    if str(hf_config.get("model_type", "")).startswith("qwen2-"):
        return "qwen2"
    return None
