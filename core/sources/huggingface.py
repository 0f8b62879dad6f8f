"""Hugging Face checkpoints: ``model.safetensors`` (single or sharded) and ``pytorch_model.bin``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from . import Checkpoint, checkpoint_dir, read_json

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"


def _sharded_files(root: Path, index_name: str) -> dict[str, Path]:
    """``{tensor name: shard file}`` from a shard index; empty when there is no index."""
    index = root / index_name
    if index.is_file():
        data = read_json(index, index_name)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = {name: root / file for name, file in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{index_name} in '{root}' names missing shard(s): {', '.join(missing)}")
        return files
    return {}


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, root: Path):
        root = checkpoint_dir(root)
        super().__init__(root, read_json(root / "config.json", "config.json"), "huggingface-safetensors")
        files = _sharded_files(root, SAFETENSORS_INDEX)
        paths = sorted(set(files.values())) if files else sorted(root.glob("*.safetensors"))
        if not paths:
            raise CheckpointError(f"no .safetensors files in '{root}'")
        self._handles = {}
        self._where: dict[str, Path] = {}
        for path in paths:
            for name in self._open(path).keys():
                self._where[name] = path
        if files:
            absent = sorted(n for n, p in files.items() if self._where.get(n) != p)
            if absent:
                raise CheckpointError(f"{SAFETENSORS_INDEX} lists tensors its shards do not hold: {', '.join(absent[:5])}")

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), framework="numpy")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"cannot read '{path}': {exc}") from None
            self._handles[path] = handle
        return handle

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str):
        sl = self._open(self._where[name]).get_slice(name)
        return tuple(sl.get_shape()), str(sl.get_dtype()).lower()

    def get(self, name: str) -> np.ndarray:
        try:
            return self._open(self._where[name]).get_tensor(name)
        except KeyError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"cannot read tensor '{name}' from '{self._where[name]}': {exc}") from None

    def close(self):
        self._handles.clear()


class TorchCheckpoint(Checkpoint):
    def __init__(self, root: Path):
        root = checkpoint_dir(root)
        super().__init__(root, read_json(root / "config.json", "config.json"), "huggingface-torch")
        try:
            import torch  # noqa: F401
        except ImportError:
            raise CheckpointError(
                f"'{root}' holds pytorch_model.bin weights; reading them needs torch: pip install torch"
            ) from None
        files = _sharded_files(root, TORCH_INDEX)
        paths = sorted(set(files.values())) if files else sorted(root.glob("pytorch_model*.bin"))
        self._where: dict[str, Path] = {}
        self._loaded: dict[Path, dict] = {}
        for path in paths:
            for name in self._load(path):
                self._where[name] = path

    def _load(self, path: Path) -> dict:
        state = self._loaded.get(path)
        if state is None:
            import torch

            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"cannot read '{path}': {exc}") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"'{path}' does not hold a state dict")
            self._loaded[path] = state
        return state

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str):
        t = self._load(self._where[name])[name]
        return tuple(t.shape), str(t.dtype).replace("torch.", "")

    def get(self, name: str) -> np.ndarray:
        import torch

        t = self._load(self._where[name])[name]
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()

    def close(self):
        self._loaded.clear()


def detect_safetensors(path: Path) -> bool:
    return path.is_dir() and ((path / SAFETENSORS_INDEX).is_file() or any(path.glob("*.safetensors")))


def detect_torch(path: Path) -> bool:
    return path.is_dir() and ((path / TORCH_INDEX).is_file() or any(path.glob("pytorch_model*.bin")))
