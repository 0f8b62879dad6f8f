"""The compile cache: any model reference -> weights + config + a library for this device.

``chat``, ``serve``, ``Engine`` and ``ChatModule`` take a kiln model directory, a Hugging Face
checkpoint directory, a ``.gguf`` file or a packaged model name.  Whatever is missing (converted
weights, the config, the library) is built once into ``$KILN_HOME`` (default
``~/.cache/kiln``) and reused:

* ``models/<name>-<quantization>-<key>/``: weights, ``mlc-chat-config.json``, tokenizer and
  ``lib-<device>.so`` of a checkpoint, keyed by the source (path, size, modification time),
  quantization, size overrides, target, kiln version and a digest of the source code of kiln
  and its loaded plugins (:func:`code_fingerprint`: new kernels never reuse old libraries);
* ``libs/<name>-<key>.so``: a library compiled for a kiln model directory that came without one
  (or with size overrides), keyed by its config, overrides, target, kiln version and code.

Size overrides (``context_window_size``, ``prefill_chunk_size``, ``max_batch_size``,
``sliding_window_size``; ``"k=v;k=v"`` or a dict) are compiled into the library; each distinct
set is its own entry, and no overrides keeps the key it always had.

An entry is complete only when its manifest (``kiln-cache.json``) is there and every file
matches it (sizes; the md5 of the library, the config, the weight index and the tokenizer
files; the weight shards' md5); anything else is rebuilt.
Builds happen in a staging directory under a per-entry file lock, so two processes asking
for the same model at once build it once and never see half of it; a staging directory left by
a killed build is removed by the next build of that entry.  Entries built by other code (before
an upgrade or an edit) are never loaded again; ``kiln cache list`` marks them and ``kiln cache
clear --stale`` removes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import CheckpointError, KilnError
from ..registry import get_registry
from ..sources import resolve_source
from .gen_config import CHAT_CONFIG, read_chat_config
from .output import staging_prefix, sweep_stale_staging

log = logging.getLogger("kiln")

MANIFEST = "kiln-cache.json"
# chosen by measurement on SmolLM2-135M (see README, "Choosing the CPU quantization")
DEFAULT_QUANTIZATION = {"cpu": "q4f32_2"}
FALLBACK_QUANTIZATION = "q4f16_1"
# JIT libraries allow this many concurrent sequences; the engine picks its own batch below it
JIT_MAX_BATCH = 32


def kiln_home() -> Path:
    return Path(os.environ.get("KILN_HOME") or Path.home() / ".cache" / "kiln").expanduser()


@dataclass
class Prepared:
    """A model ready to load: where its weights/config are, its library, its display name."""

    model_dir: Path
    lib: Path
    name: str
    built: bool = False  # True when this call converted or compiled something


def pick_backend(device: str, registry=None):
    """The backend for ``device`` (``auto``: the highest-priority one present on this machine)."""
    registry = registry or get_registry()
    if device in (None, "", "auto"):
        for spec in registry.backends():
            try:
                if spec.is_available():
                    return spec
            except Exception:  # noqa: BLE001 - a probe that fails means "not available"
                continue
        raise KilnError("no device backend is available: pip install kiln-backends")
    return registry.backend(device.partition(":")[0])


def _overrides_text(sizes: dict) -> str | None:
    return ";".join(f"{k}={v}" for k, v in sizes.items()) or None


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_md5(path: Path) -> str:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            md5.update(block)
    return md5.hexdigest()


def fingerprint(path: Path) -> dict:
    """What identifies a checkpoint's content cheaply: its files' sizes and modification times."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir()
        if p.is_file() and (p.suffix in (".json", ".safetensors", ".bin", ".gguf", ".model") or p.name == "tokenizer.json")
    )
    return {"path": str(path), "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


_code_digest: str | None = None


# the parts of kiln that decide what a conversion and a compilation produce
_BUILD_CODE = ("pipeline", "quantization", "sources", "modeling.py", "model_config.py", "specs.py")


def code_fingerprint(registry) -> str:
    """A digest of the Python source that converts and compiles: kiln's pipeline, model building
    blocks, quantization and sources, and every loaded plugin.  An upgrade or an edit (an
    editable install, a new schedule) gets new cache entries instead of libraries built by the
    old code; editing the runtime, the server or the CLI does not."""
    global _code_digest
    if _code_digest is None:
        import importlib.util

        core = Path(__file__).resolve().parents[1]  # the kiln package
        roots = {core / part for part in _BUILD_CODE}
        for info in registry.plugins.values():
            if info.status != "loaded" or not info.module:
                continue
            spec = importlib.util.find_spec(info.module.split(".")[0])
            origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
            if origin is not None:
                roots.add(origin.parent if origin.name == "__init__.py" else origin)
        digest = hashlib.sha256()
        for root in sorted(roots):
            for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
                digest.update(str(path.relative_to(root.parent)).encode())
                digest.update(path.read_bytes())
        digest.update(__version__.encode())
        _code_digest = digest.hexdigest()[:16]
    return _code_digest


def _name_of(path: Path, ref) -> str:
    name = str(ref) if not Path(ref).expanduser().exists() else (path.stem if path.is_file() else path.name)
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:60] or "model"


# ------------------------------------------------------------------------------- validity
def entry_problem(entry: Path, key: dict) -> str | None:
    """Why ``entry`` cannot be used as it is (``None``: it is complete and intact)."""
    from .tensor_cache import verify_md5

    manifest_path = entry / MANIFEST
    if not manifest_path.is_file():
        return "it was left half-written"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return "its manifest is unreadable"
    if manifest.get("key") != key:
        return "it was built from other inputs"
    for name, info in manifest.get("files", {}).items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != info["size"]:
            return f"{name} is missing or truncated"
        if info.get("md5") and _file_md5(path) != info["md5"]:
            return f"{name} fails its md5 check"
    if manifest.get("weights"):
        try:
            verify_md5(entry)
        except CheckpointError as exc:
            return str(exc)
    return None


def _write_manifest(entry: Path, key: dict, lib_names: list[str], weights: bool, extra: dict) -> None:
    names = list(lib_names)
    if weights:
        tokenizer = json.loads((entry / CHAT_CONFIG).read_text()).get("tokenizer_files") or []
        names += [CHAT_CONFIG, "tensor-cache.json", *(n for n in tokenizer if (entry / n).is_file())]
    # the shards have their md5 in tensor-cache.json; every other file has it here
    files = {n: {"size": (entry / n).stat().st_size, "md5": _file_md5(entry / n)} for n in dict.fromkeys(names)}
    manifest = {"key": key, "files": files, "weights": weights, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "kiln_version": __version__, **extra}
    (entry / MANIFEST).write_text(json.dumps(manifest, indent=2))  # written last: marks the entry complete


def _lock(entry: Path):
    from filelock import FileLock

    locks = kiln_home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{entry.name}.lock"))


def _install(staging: Path, entry: Path) -> None:
    """Put a finished staging directory in place of ``entry`` (removing a damaged one)."""
    if entry.exists():
        shutil.rmtree(entry)
    os.replace(staging, entry)


# ------------------------------------------------------------------------------- building
def _new_staging(entry: Path) -> Path:
    """A staging directory for ``entry`` named after this process, after removing those that
    processes killed while building left behind (called under the entry's lock)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(entry)
    return Path(tempfile.mkdtemp(prefix=staging_prefix(entry), dir=entry.parent))


def _build_checkpoint_entry(source: Path, entry: Path, key: dict, quantization: str, backend, opts: str | None,
                            show_progress, sizes: dict) -> None:
    from .compile import compile_model
    from .convert_weight import convert_weight
    from .gen_config import gen_config

    staging = _new_staging(entry)
    try:
        started = time.time()
        log.info("Converting %s to %s (first use; cached in %s)", source, quantization, entry)
        convert_weight(source, quantization, staging, show_progress=show_progress, overwrite=True)
        batch = {} if "max_batch_size" in sizes else {"max_batch_size": JIT_MAX_BATCH}
        gen_config(source, quantization, staging, overrides=_overrides_text(sizes), **batch)
        lib_name = f"lib-{backend.name}{backend.lib_suffix}"
        log.info("Compiling the model library for %s", backend.name)
        compile_model(staging, backend.name, staging / lib_name, opt=opts)
        _write_manifest(staging, key, [lib_name], weights=True,
                        extra={"source": str(source), "quantization": quantization, "device": backend.name})
        _install(staging, entry)
        log.info("Model ready in %.1f s: %s", time.time() - started, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build_library_entry(model_dir: Path, entry: Path, key: dict, backend, opts: str | None, sizes: dict) -> None:
    from .compile import compile_model

    staging = _new_staging(entry)
    try:
        lib_name = f"lib-{backend.name}{backend.lib_suffix}"
        log.info("Compiling a model library for %s on %s (first use; cached in %s)", model_dir, backend.name, entry)
        compile_model(model_dir, backend.name, staging / lib_name, opt=opts, overrides=_overrides_text(sizes))
        _write_manifest(staging, key, [lib_name], weights=False,
                        extra={"source": str(model_dir), "device": backend.name})
        _install(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cached(entry: Path, key: dict, build) -> bool:
    """Make sure ``entry`` is complete, building it under its lock; ``True`` if built now."""
    problem = entry_problem(entry, key)
    if problem is None:
        return False
    with _lock(entry):
        problem = entry_problem(entry, key)  # another process may have built it meanwhile
        if problem is None:
            return False
        if entry.exists():
            log.warning("cache entry %s is unusable (%s); rebuilding it", entry, problem)
        build()
    return True


def prepare(model, model_lib=None, device: str = "auto", quantization: str | None = None,
            opts: str | None = None, show_progress: bool | None = None, overrides=None) -> Prepared:
    """Resolve a model reference to a model directory and a library, building what is missing.

    ``overrides`` (see :func:`kiln.pipeline.compile.parse_size_overrides`) and the backend options
    ``opts`` are compiled into the library that is built;
    a library given as ``model_lib`` is used as it was built."""
    from .compile import parse_size_overrides

    sizes = parse_size_overrides(overrides)  # a mistake fails before any work
    if model_lib is not None and opts:
        log.warning("ignoring --opt %s: the library %s is used as it was built", opts, model_lib)
        opts = None
    registry = get_registry()
    source = resolve_source(model, registry, runtime=True)
    name = _name_of(source, model)
    backend = pick_backend(device, registry)
    from .compile import make_target, parse_opts

    target = str(make_target(backend, parse_opts(opts, backend)))
    home = kiln_home()
    code = code_fingerprint(registry)  # new kernels or schedules must not reuse old libraries

    if source.is_dir() and (source / CHAT_CONFIG).is_file():  # a kiln model directory
        if quantization is not None:
            log.warning("ignoring quantization=%s: '%s' is already converted", quantization, model)
        if model_lib is not None:
            return Prepared(source, Path(model_lib).expanduser(), name)
        read_chat_config(source)  # a broken config is a one-line error here, not later
        key = {"kind": "library", "config": hashlib.sha256((source / CHAT_CONFIG).read_bytes()).hexdigest(),
               "model": str(source.resolve()), "target": target, "opts": opts or "", "kiln": __version__,
               "code": code}
        if sizes:  # absent without overrides: entries built before overrides existed keep their key
            key["overrides"] = sizes
        entry = home / "libs" / f"{name}-{_digest(key)}"
        built = _cached(entry, key, lambda: _build_library_entry(source, entry, key, backend, opts, sizes))
        return Prepared(source, entry / f"lib-{backend.name}{backend.lib_suffix}", name, built)

    quant = quantization or DEFAULT_QUANTIZATION.get(backend.name, FALLBACK_QUANTIZATION)
    registry.quantization(quant)  # an unknown name fails before any work
    if model_lib is not None:
        sizes = {}  # the given library is used as it was built; only the weights come from the cache
    key = {"kind": "model", "source": fingerprint(source), "quantization": quant, "target": target,
           "opts": opts or "", "kiln": __version__, "code": code}
    if sizes:
        key["overrides"] = sizes
    entry = home / "models" / f"{name}-{quant}-{_digest(key)}"
    built = _cached(entry, key, lambda: _build_checkpoint_entry(source, entry, key, quant, backend, opts, show_progress,
                                                                sizes))
    lib = Path(model_lib).expanduser() if model_lib else entry / f"lib-{backend.name}{backend.lib_suffix}"
    return Prepared(entry, lib, name, built)


# ------------------------------------------------------------------------------- kiln cache
def list_entries() -> list[dict]:
    """Every cache entry with its manifest (``complete: False`` for unusable leftovers, ``stale:
    True`` for entries other code built, which this kiln never loads)."""
    out = []
    home = kiln_home()
    code = code_fingerprint(get_registry())
    for kind in ("models", "libs"):
        root = home / kind
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if not entry.is_dir():
                continue
            size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
            try:
                manifest = json.loads((entry / MANIFEST).read_text())
            except (OSError, ValueError):
                manifest = {}
            out.append({"path": str(entry), "kind": kind[:-1], "complete": bool(manifest), "size": size,
                        "stale": bool(manifest) and manifest.get("key", {}).get("code") != code,
                        "source": manifest.get("source", ""), "quantization": manifest.get("quantization", ""),
                        "device": manifest.get("device", ""), "created": manifest.get("created", "")})
    return out


def clear(entries: list[str] | None = None, stale: bool = False) -> int:
    """Delete the given entries (paths or names), the stale ones (built by other code), or all of
    them; return how many."""
    removed = 0
    for entry in list_entries():
        path = Path(entry["path"])
        if entries and path.name not in entries and str(path) not in entries:
            continue
        if stale and not entry["stale"]:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    if not entries and not stale:
        shutil.rmtree(kiln_home() / "locks", ignore_errors=True)
    return removed
