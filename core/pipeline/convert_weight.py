"""``kiln convert_weight``: checkpoint -> quantized tensor cache, streamed and atomic."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import CheckpointError, KilnError, OutputExistsError
from ..progress import progress_bar
from ..registry import get_registry
from ..sources import Checkpoint, open_checkpoint
from ..specs import WeightSource
from .model import BuiltModel, build_model
from .output import move_into, staging_dir
from .tensor_cache import CACHE_JSON, LEGACY_CACHE_JSON, ShardWriter, find_cache_json

log = logging.getLogger("kiln")


def resolve(checkpoint: Checkpoint, model_type: str | None, registry):
    """The architecture spec and parsed model config of a checkpoint."""
    arch = registry.architecture(model_type) if model_type else registry.resolve_architecture(checkpoint.config)
    return arch, arch.config_class.from_dict(checkpoint.config)


def existing_weights(output: Path) -> list[str]:
    """Files of an earlier conversion in ``output``."""
    if not output.is_dir():
        return []
    names = [p.name for p in output.glob("params_shard_*.bin")]
    names += [n for n in (CACHE_JSON, LEGACY_CACHE_JSON) if (output / n).exists()]
    return names


def _check_sources(built: BuiltModel, checkpoint: Checkpoint, mapping: dict) -> None:
    available = set(checkpoint.names())
    missing = []
    for name, _, _ in built.float_params:
        src = mapping.get(name, WeightSource((name,)))
        missing += [n for n in src.names if n not in available]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise CheckpointError(
            f"checkpoint '{checkpoint.root}' lacks {len(missing)} tensor(s) the {built.arch.name} model needs: {shown}"
        )


def iter_stored_tensors(built: BuiltModel, checkpoint: Checkpoint):
    """Yield ``(parameter name, {stored name: array})`` one parameter at a time."""
    mapping = dict(built.arch.weight_map(built.config))
    _check_sources(built, checkpoint, mapping)
    dtype = built.quant.scheme.model_dtype
    for name, shape, _ in built.float_params:
        src = mapping.get(name, WeightSource((name,)))
        arrays = [np.asarray(checkpoint.get(n)) for n in src.names]
        try:
            value = src.build(arrays)
        except ValueError as exc:
            shapes = ", ".join(f"{n}{tuple(a.shape)}" for n, a in zip(src.names, arrays))
            raise CheckpointError(f"cannot build '{name}' from {shapes}: {exc}") from None
        if tuple(value.shape) != shape:
            raise CheckpointError(
                f"tensor '{name}' has shape {tuple(value.shape)} in the checkpoint but the model config implies {shape}"
            )
        value = value.astype(np.float32) if value.dtype != np.float32 else value
        del arrays
        quantize = built.plan.get(name)
        yield name, ({name: value.astype(dtype)} if quantize is None else quantize(value))


def convert_weight(
    checkpoint: str | Path,
    quantization: str,
    output: str | Path,
    model_type: str | None = None,
    source_format: str = "auto",
    overwrite: bool = False,
    show_progress: bool | None = None,
    registry=None,
) -> Path:
    """Convert ``checkpoint`` into ``output`` (tensor-cache.json + params_shard_*.bin)."""
    registry = registry or get_registry()
    quant = registry.quantization(quantization)
    output = Path(output).expanduser()
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output '{output}' exists and is not a directory")
    previous = existing_weights(output)
    if previous and not overwrite:
        raise OutputExistsError(
            f"'{output}' already holds converted weights ({find_cache_json(output).name if find_cache_json(output) else previous[0]}); "
            "pass --overwrite to replace them"
        )
    started = time.time()
    with open_checkpoint(checkpoint, source_format, registry) as ckpt:
        arch, config = resolve(ckpt, model_type, registry)
        built = build_model(arch, config, quant)
        expected = {p["name"]: p for p in built.stored_params()}
        with staging_dir(output) as tmp:
            writer = ShardWriter(tmp)
            with progress_bar(f"Converting to {quant.name}", len(built.float_params), show_progress) as advance:
                for param, stored in iter_stored_tensors(built, ckpt):
                    for name, array in stored.items():
                        want = expected.get(name)
                        if want is None or list(array.shape) != want["shape"] or str(array.dtype) != want["dtype"]:
                            raise KilnError(
                                f"quantization '{quant.name}' produced {name} {array.dtype}{list(array.shape)}, "
                                f"but the model expects {want and (want['dtype'], want['shape'])}"
                            )
                        writer.append(name, array)
                    advance(1, param)
            written = {r["name"] for s in writer.shards for r in s["records"]}
            if written != set(expected):
                raise KilnError(f"conversion wrote no value for: {', '.join(sorted(set(expected) - written))}")
            n_params = sum(int(np.prod(s)) for _, s, _ in built.float_params)
            writer.finish(
                {
                    "ParamSize": len(expected),
                    "ParamBytes": writer.total_bytes,
                    "BitsPerParam": 8.0 * writer.total_bytes / max(n_params, 1),
                    "kiln": {
                        "version": __version__,
                        "model_type": arch.name,
                        "quantization": quant.name,
                        "source": str(Path(checkpoint)),
                        "source_format": ckpt.source,
                    },
                }
            )
            move_into(tmp, output, last=CACHE_JSON, remove=previous)
    log.info(
        "converted %s (%d tensors, %.1f MB, %.2f bits/param) to %s in %.1fs",
        arch.name, len(expected), writer.total_bytes / 1e6, 8.0 * writer.total_bytes / max(n_params, 1), output,
        time.time() - started,
    )
    return output
