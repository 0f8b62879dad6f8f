"""What ``Engine``, ``ChatModule``, ``kiln chat`` and ``kiln serve`` accept as a model.

A kiln model directory (with its library given, beside it, or compiled into the cache), a
Hugging Face checkpoint directory, a ``.gguf`` file, or a packaged model name (``smollm2``);
the last three are converted, configured and compiled once into the cache (``kiln.pipeline.jit``).
"""

from __future__ import annotations

from pathlib import Path

from ..pipeline.gen_config import CHAT_CONFIG
from ..pipeline.jit import Prepared, prepare


def find_library(model_dir: Path) -> Path | None:
    """The one model library stored beside converted weights, if there is exactly one."""
    libs = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".so", ".dylib", ".dll"))
    return libs[0] if len(libs) == 1 else None


def resolve_model(model, model_lib=None, device: str = "auto", quantization: str | None = None,
                  overrides=None, opt: str | None = None) -> Prepared:
    """A loadable model directory and library for a model reference.  With size ``overrides``
    or backend options ``opt`` (``compile --opt``) and no ``model_lib``, a library built with
    them is compiled into the cache (a library that sits beside the weights was built without them)."""
    path = Path(model).expanduser()
    if model_lib is None and not overrides and not opt and path.is_dir() and (path / CHAT_CONFIG).is_file():
        model_lib = find_library(path)
    return prepare(model, model_lib, device, quantization, opts=opt, overrides=overrides)
