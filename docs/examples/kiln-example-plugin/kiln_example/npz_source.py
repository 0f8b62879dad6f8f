"""A model source: a directory with config.json and weights.npz (Hugging Face tensor names)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.sources import Checkpoint, checkpoint_dir, read_json


def detect(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "weights.npz").is_file()


def packaged_models() -> dict[str, Path]:
    """Models this package ships, by name: ``kiln convert_weight tiny-qwen2-example ...`` finds them."""
    root = Path(__file__).parent / "models"
    return {"tiny-qwen2-example": root / "tiny-qwen2"}


class NpzCheckpoint(Checkpoint):
    def __init__(self, root: Path):
        root = checkpoint_dir(root)
        super().__init__(root, read_json(root / "config.json", "config.json"), "npz")
        self._npz = np.load(root / "weights.npz")  # lazy: each tensor is read when asked for

    def names(self):
        return list(self._npz.files)

    def info(self, name):
        arr = self._npz[name]
        return tuple(arr.shape), str(arr.dtype)

    def get(self, name):
        return self._npz[name]

    def close(self):
        self._npz.close()
