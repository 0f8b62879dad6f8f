"""TVM's tensor-cache format (MLC-compatible), written as a stream.

``tensor-cache.json`` + ``params_shard_N.bin``: each shard holds tensors back to back, at most
``shard_cap`` bytes (a larger tensor gets a shard of its own), and records its md5.  The
writer appends tensor by tensor straight to disk, so its memory use is one tensor.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, MismatchError

CACHE_JSON = "tensor-cache.json"
LEGACY_CACHE_JSON = "ndarray-cache.json"
SHARD_CAP = 32 << 20


def dtype_str(array: np.ndarray) -> str:
    name = str(array.dtype)
    return "bfloat16" if name == "bfloat16" else np.dtype(array.dtype).name


class ShardWriter:
    """Append tensors to ``params_shard_*.bin`` files in ``directory``."""

    def __init__(self, directory: Path, shard_cap: int = SHARD_CAP):
        self.directory = Path(directory)
        self.shard_cap = shard_cap
        self.shards: list[dict] = []
        self._file = None
        self._md5 = None
        self._offset = 0
        self.total_bytes = 0
        self.count = 0

    def _close_shard(self):
        if self._file is None:
            return
        self._file.close()
        shard = self.shards[-1]
        shard["nbytes"] = self._offset
        shard["md5sum"] = self._md5.hexdigest()
        self._file = None

    def _open_shard(self):
        self._close_shard()
        name = f"params_shard_{len(self.shards)}.bin"
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 - closed in _close_shard
        self._md5 = hashlib.md5()
        self._offset = 0
        self.shards.append({"dataPath": name, "format": "raw-shard", "nbytes": 0, "records": [], "md5sum": ""})

    def append(self, name: str, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array)
        nbytes = data.nbytes
        if self._file is None or (self._offset and self._offset + nbytes > self.shard_cap):
            self._open_shard()
        buf = memoryview(data.view(np.uint8).reshape(-1)) if nbytes else b""
        self._file.write(buf)
        self._md5.update(buf)
        self.shards[-1]["records"].append(
            {
                "name": name,
                "shape": [int(s) for s in data.shape],
                "dtype": dtype_str(data),
                "format": "raw",
                "nbytes": int(nbytes),
                "byteOffset": self._offset,
            }
        )
        self._offset += nbytes
        self.total_bytes += nbytes
        self.count += 1

    def finish(self, metadata: dict) -> None:
        """Close the last shard and write ``tensor-cache.json`` (the last file written)."""
        self._close_shard()
        path = self.directory / CACHE_JSON
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"metadata": metadata, "records": self.shards}, f, indent=2)


def find_cache_json(directory: Path) -> Path | None:
    for name in (CACHE_JSON, LEGACY_CACHE_JSON):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def read_index(directory: Path) -> dict:
    path = find_cache_json(directory)
    if path is None:
        raise CheckpointError(f"no {CACHE_JSON} in '{directory}': run `kiln convert_weight` to create the weights")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["records"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is unreadable or malformed: {exc}") from None
    return data


def param_records(index: dict) -> dict[str, dict]:
    return {rec["name"]: rec for shard in index["records"] for rec in shard["records"]}


def verify_md5(directory: Path, index: dict | None = None) -> None:
    """Raise if any shard is missing, truncated or fails its md5."""
    index = index or read_index(directory)
    for shard in index["records"]:
        path = Path(directory) / shard["dataPath"]
        if not path.is_file():
            raise CheckpointError(f"weight shard {path} is missing")
        if path.stat().st_size != shard["nbytes"]:
            raise CheckpointError(f"weight shard {path} has {path.stat().st_size} bytes, expected {shard['nbytes']}")
        if shard.get("md5sum"):
            md5 = hashlib.md5()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    md5.update(block)
            if md5.hexdigest() != shard["md5sum"]:
                raise CheckpointError(f"weight shard {path} fails its md5 check: the file is corrupted")


def check_params(index: dict, expected: list[dict], where: str) -> None:
    """Refuse weights whose names/shapes/dtypes differ from what a library was built for."""
    have = param_records(index)
    missing = [p["name"] for p in expected if p["name"] not in have]
    if missing:
        raise MismatchError(
            f"the weights in {where} lack {len(missing)} parameter(s) the model library needs "
            f"(e.g. {', '.join(missing[:3])}): they were converted for another model or quantization"
        )
    for p in expected:
        rec = have[p["name"]]
        if list(rec["shape"]) != list(p["shape"]) or rec["dtype"] != p["dtype"]:
            raise MismatchError(
                f"parameter '{p['name']}' in {where} is {rec['dtype']}{rec['shape']} but the model library "
                f"expects {p['dtype']}{list(p['shape'])}"
            )
