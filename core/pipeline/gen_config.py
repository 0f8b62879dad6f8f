"""``kiln gen_config``: write ``mlc-chat-config.json`` and the tokenizer beside the weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import __version__
from ..errors import ConfigError
from ..registry import get_registry
from ..sources import open_checkpoint
from .convert_weight import resolve
from .model import apply_overrides, check_supported, parse_overrides
from .output import atomic_write_text

log = logging.getLogger("kiln")

CHAT_CONFIG = "mlc-chat-config.json"
JINJA_TEMPLATE = "jinja"  # conv_template value meaning "the checkpoint's own chat_template"

GENERATION_DEFAULTS = {
    "temperature": 0.7,
    "top_p": 0.95,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}


def _first(key: str, *sources: dict, default=None):
    for src in sources:
        if src.get(key) is not None:
            return src[key]
    return default


def gen_config(
    checkpoint: str | Path,
    quantization: str,
    output: str | Path,
    conv_template: str | None = None,
    model_type: str | None = None,
    context_window_size: int | None = None,
    prefill_chunk_size: int | None = None,
    max_batch_size: int | None = None,
    sliding_window_size: int | None = None,
    overrides: str | None = None,
    source_format: str = "auto",
    registry=None,
) -> Path:
    """Write ``output/mlc-chat-config.json`` (and the tokenizer files); return its path."""
    registry = registry or get_registry()
    quant = registry.quantization(quantization)
    output = Path(output).expanduser()
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output '{output}' exists and is not a directory")
    with open_checkpoint(checkpoint, source_format, registry) as ckpt:
        arch, config = resolve(ckpt, model_type, registry)
        opts = parse_overrides(overrides)
        for key, value in (
            ("context_window_size", context_window_size),
            ("prefill_chunk_size", prefill_chunk_size),
            ("max_batch_size", max_batch_size),
            ("sliding_window_size", sliding_window_size),
        ):
            if value is not None:
                opts[key] = value
        apply_overrides(config, opts)
        check_supported(arch, config)

        tok_cfg = ckpt.tokenizer_config
        chat_template = tok_cfg.get("chat_template") if isinstance(tok_cfg.get("chat_template"), str) else None
        if conv_template is None:
            conv_template = JINJA_TEMPLATE if chat_template else arch.default_conv_template
        if conv_template == JINJA_TEMPLATE:
            if not chat_template:
                raise ConfigError(
                    f"--conv-template {JINJA_TEMPLATE} needs a chat_template in the checkpoint's tokenizer_config.json; "
                    f"choose one of: {', '.join(registry.names('conv_templates'))}"
                )
        else:
            registry.conv_template(conv_template)  # raises with the list of valid names

        gen = ckpt.generation_config
        hf = ckpt.config
        output.mkdir(parents=True, exist_ok=True)
        tokenizer_files = ckpt.write_tokenizer(output)
        if not tokenizer_files:
            log.warning("no tokenizer files found in %s; the model will need one before it can chat", ckpt.root)

        chat_config = {
            "version": __version__,
            "model_type": arch.name,
            "quantization": quant.name,
            "model_config": config.to_dict(),
            "vocab_size": config.vocab_size,
            "context_window_size": config.context_window_size,
            "sliding_window_size": config.sliding_window_size,
            "prefill_chunk_size": config.prefill_chunk_size,
            "attention_sink_size": config.attention_sink_size,
            "tensor_parallel_shards": config.tensor_parallel_shards,
            "max_batch_size": config.max_batch_size,
            **{k: _first(k, gen, hf, default=v) for k, v in GENERATION_DEFAULTS.items()},
            "mean_gen_len": 128,
            "max_gen_len": 512,
            "conv_template": conv_template,
            "chat_template": chat_template if conv_template == JINJA_TEMPLATE else None,
            "pad_token_id": _first("pad_token_id", gen, hf, default=0),
            "bos_token_id": _first("bos_token_id", gen, hf, default=1),
            "eos_token_id": _first("eos_token_id", gen, hf, default=2),
            "tokenizer_files": tokenizer_files,
            "kiln_version": __version__,
        }
        path = output / CHAT_CONFIG
        atomic_write_text(path, json.dumps(chat_config, indent=2) + "\n")
    log.info("wrote %s (conv template %s)", path, conv_template)
    return path


def read_chat_config(path: str | Path) -> tuple[dict, Path]:
    """Read ``mlc-chat-config.json`` given the file or its directory; return it and its directory."""
    from ..sources import read_json

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CHAT_CONFIG
    if not path.exists():
        raise ConfigError(f"{path} does not exist: run `kiln gen_config` to create it")
    data = read_json(path, CHAT_CONFIG)
    for key in ("model_type", "quantization", "model_config"):
        if key not in data:
            raise ConfigError(f"{path} lacks '{key}'")
    return data, path.parent
