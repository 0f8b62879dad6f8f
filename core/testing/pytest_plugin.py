"""pytest fixtures for kiln and its plugins (``pytest_plugins = ["kiln.testing.pytest_plugin"]``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Built:
    """A converted and compiled model: weights + config in ``model_dir``, library ``lib``."""

    model_dir: Path
    lib: Path


class ModelBuilder:
    """Converts, configures and compiles checkpoints, once per distinct request in a session."""

    def __init__(self, root: Path):
        self.root = root
        self._done: dict[tuple, Built] = {}
        self._lock = threading.Lock()

    def __call__(self, checkpoint, quantization: str = "q0f32", device: str = "cpu", conv_template: str | None = "LM",
                 opt: str | None = None, **gen_config_kwargs) -> Built:
        from ..pipeline.compile import compile_model
        from ..pipeline.convert_weight import convert_weight
        from ..pipeline.gen_config import gen_config

        key = (str(checkpoint), quantization, device, conv_template, opt, tuple(sorted(gen_config_kwargs.items())))
        with self._lock:
            if key not in self._done:
                out = self.root / f"model{len(self._done)}"
                convert_weight(checkpoint, quantization, out, show_progress=False)
                gen_config(checkpoint, quantization, out, conv_template=conv_template, **gen_config_kwargs)
                lib = compile_model(out, device, out / f"lib-{device}.so", opt=opt)
                self._done[key] = Built(out, lib)
            return self._done[key]


@pytest.fixture(scope="session")
def kiln_build(tmp_path_factory) -> ModelBuilder:
    """``kiln_build(checkpoint, quantization="q0f32", device="cpu", ...) -> Built``, cached per session."""
    return ModelBuilder(tmp_path_factory.mktemp("kiln-models"))
