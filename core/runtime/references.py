"""What ``Engine``, ``ChatModule``, ``kiln chat`` and ``kiln serve`` accept as a model.

A kiln model directory (``mlc-chat-config.json`` + converted weights), with the model library
given explicitly or found beside the weights.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..pipeline.gen_config import CHAT_CONFIG


def find_library(model_dir: Path) -> Path | None:
    libs = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".so", ".dylib", ".dll"))
    return libs[0] if len(libs) == 1 else None


def resolve_model(model, model_lib=None, device: str = "auto") -> tuple[Path, Path]:
    """``(model directory, model library)`` for a model reference."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ConfigError(f"model '{model}' not found: give a kiln model directory (made by `kiln convert_weight` "
                          "and `kiln gen_config`)")
    if path.is_file() and path.name == CHAT_CONFIG:
        path = path.parent
    if not (path / CHAT_CONFIG).is_file():
        raise ConfigError(f"'{model}' is not a kiln model directory: it has no {CHAT_CONFIG} (run `kiln gen_config`)")
    if model_lib is None:
        model_lib = find_library(path)
        if model_lib is None:
            raise ConfigError(f"no model library for '{model}': pass model_lib (--model-lib), built with `kiln compile`")
    return path, Path(model_lib).expanduser()
