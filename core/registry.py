"""Merge what the plugins registered, refuse conflicts, answer lookups.

``get_registry()`` builds the registry once per process; ``Registry.build(pm, infos)`` does it
for an explicit plugin manager (tests).  Each ``register_*`` hook implementation is called on
its own, so a plugin whose hook raises is marked failed without hiding the others' answers.  A
name registered by two plugins marks the later one failed too, so ``kiln plugins`` can show it,
and makes every lookup raise the error naming both.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import PluginError, UnknownNameError, did_you_mean
from .plugins import PluginInfo, create_plugin_manager
from .specs import ArchitectureSpec, BackendSpec, ConvTemplateSpec, ModelSourceSpec, QuantizationSpec

# Packages that provide architectures and devices kiln knows of but that may not be installed.
KNOWN_ARCHITECTURE_PACKAGES = {
    "llama": "kiln-llama",
    "mistral": "kiln-llama",
    "gpt_neox": "kiln-gpt-neox",
    "gptj": "kiln-gptj",
    "rwkv": "kiln-rwkv",
    "mamba": "kiln-mamba",
}
KNOWN_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "GPTNeoXForCausalLM": "gpt_neox",
    "GPTJForCausalLM": "gptj",
    "RwkvForCausalLM": "rwkv",
    "MambaForCausalLM": "mamba",
}
KNOWN_BACKEND_PACKAGES = {name: "kiln-backends" for name in ("cpu", "cuda", "vulkan", "metal", "opencl", "webgpu")}

# (hook name, kind shown in `kiln plugins`, spec type)
LABELS = {
    "architectures": "architecture",
    "quantizations": "quantization",
    "backends": "device",
    "conv_templates": "conversation template",
    "model_sources": "model source",
}

KINDS = (
    ("register_architectures", "architectures", ArchitectureSpec),
    ("register_quantizations", "quantizations", QuantizationSpec),
    ("register_backends", "backends", BackendSpec),
    ("register_conv_templates", "conv_templates", ConvTemplateSpec),
    ("register_model_sources", "model_sources", ModelSourceSpec),
)


@dataclass(frozen=True)
class Entry:
    spec: Any
    plugin: str


class Registry:
    """Everything the installed plugins registered, by kind and name."""

    def __init__(self, pm, infos: dict[str, PluginInfo]):
        self.pm = pm
        self.plugins = infos
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for _, kind, _ in KINDS}
        self.aliases: dict[str, str] = {}
        # names two plugins registered: `kiln plugins` still lists them, every lookup refuses
        self.conflicts: list[str] = []

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, pm, infos: dict[str, PluginInfo]) -> "Registry":
        reg = cls(pm, infos)
        for hook_name, kind, spec_type in KINDS:
            caller = getattr(pm.hook, hook_name)
            for impl in caller.get_hookimpls():  # in registration order: built-ins first
                plugin = impl.plugin_name
                info = infos.get(plugin)
                if info is not None and info.status != "loaded":
                    continue
                try:
                    specs = impl.function() or ()
                    for spec in specs:
                        if not isinstance(spec, spec_type):
                            raise TypeError(f"{hook_name} returned {type(spec).__name__}, expected {spec_type.__name__}")
                        reg._add(kind, spec, plugin)
                except PluginError as exc:  # a name registered twice: the later plugin is left out ...
                    reg._fail(plugin, str(exc))
                    reg.conflicts.append(str(exc))  # ... and every lookup reports it (see _check)
                except Exception as exc:  # noqa: BLE001 - isolate a broken plugin
                    reg._fail(plugin, f"{hook_name} raised {type(exc).__name__}: {exc}")
        return reg

    def _fail(self, plugin: str, message: str):
        info = self.plugins.setdefault(plugin, PluginInfo(name=plugin))
        info.status, info.error = "failed", message
        for kind in self.entries:  # drop whatever it registered before failing
            for name in [n for n, e in self.entries[kind].items() if e.plugin == plugin]:
                del self.entries[kind][name]
        info.registered = {}

    def _add(self, kind: str, spec, plugin: str):
        table = self.entries[kind]
        names = [spec.name] + list(getattr(spec, "aliases", ()))
        for name in names:
            if name in table or (kind == "backends" and name in self.aliases):
                other = table[name].plugin if name in table else table[self.aliases[name]].plugin
                raise PluginError(
                    f"{LABELS[kind]} '{name}' is registered twice: by plugin '{other}' and by plugin "
                    f"'{plugin}'; uninstall one of them or block one with KILN_DISABLE_PLUGINS={plugin}"
                )
        table[spec.name] = Entry(spec, plugin)
        if kind == "backends":
            for alias in getattr(spec, "aliases", ()):
                self.aliases[alias] = spec.name
        info = self.plugins.setdefault(plugin, PluginInfo(name=plugin))
        info.registered.setdefault(kind, []).append(spec.name)

    # ------------------------------------------------------------------ lookups
    def _check(self) -> None:
        """Refuse to answer while two plugins claim the same name: which one wins would be a guess."""
        if self.conflicts:
            raise PluginError(self.conflicts[0])

    def names(self, kind: str) -> list[str]:
        self._check()
        return sorted(self.entries[kind])

    def _get(self, kind: str, name: str, hint: str = ""):
        self._check()
        entry = self.entries[kind].get(name)
        if entry is None and kind == "backends" and name in self.aliases:
            entry = self.entries[kind][self.aliases[name]]
        if entry is None:
            label = LABELS[kind]
            raise UnknownNameError(
                f"unknown {label} '{name}'{did_you_mean(name, self.entries[kind])}; "
                f"installed: {', '.join(self.names(kind)) or 'none'}{hint}"
            )
        return entry.spec

    def unavailable_reason(self, what: str, package: str) -> str | None:
        """Why ``what`` is missing when ``package`` is installed but failed to load or is disabled."""
        wanted = _normalize(package)
        mine = [i for i in self.plugins.values() if _normalize(i.distribution) == wanted]
        for status in ("failed", "disabled"):
            for info in mine:
                if info.status != status:
                    continue
                if status == "failed":
                    error = " ".join(info.error.split())
                    return f"{what} comes from {info.distribution}, which is installed but failed to load: {error} (see `kiln plugins`)"
                return (
                    f"{what} comes from {info.distribution}, which is installed but disabled by KILN_DISABLE_PLUGINS "
                    f"(remove '{info.name}' from it to use it)"
                )
        return None

    def failed_note(self) -> str:
        failed = [i.name for i in self.failed_plugins()]
        return f"; plugin(s) that failed to load: {', '.join(failed)} (see `kiln plugins`)" if failed else ""

    def architecture(self, name: str) -> ArchitectureSpec:
        self._check()
        if name not in self.entries["architectures"]:
            package = KNOWN_ARCHITECTURE_PACKAGES.get(name, f"kiln-{name}")
            reason = self.unavailable_reason(f"architecture '{name}'", package)
            if reason:
                raise UnknownNameError(reason)
            if name in KNOWN_ARCHITECTURE_PACKAGES:
                raise UnknownNameError(
                    f"architecture '{name}' is not installed: pip install {package} "
                    f"(installed: {', '.join(self.names('architectures')) or 'none'}){self.failed_note()}"
                )
            return self._get("architectures", name, self.failed_note())
        return self._get("architectures", name)

    def quantization(self, name: str) -> QuantizationSpec:
        return self._get("quantizations", name)

    def backend(self, name: str) -> BackendSpec:
        self._check()
        if name not in self.entries["backends"] and name not in self.aliases:
            package = KNOWN_BACKEND_PACKAGES.get(name, f"kiln-{name}")
            reason = self.unavailable_reason(f"device '{name}'", package)
            if reason:
                raise UnknownNameError(reason)
            if name not in KNOWN_BACKEND_PACKAGES:
                return self._get("backends", name, self.failed_note())
            installed = ", ".join(self.names("backends")) or "none"
            if any(_normalize(info.distribution) == package and info.status == "loaded" for info in self.plugins.values()):
                raise UnknownNameError(
                    f"device '{name}' is not supported by this version of {package} (installed devices: {installed})"
                )
            raise UnknownNameError(
                f"device '{name}' is not installed: pip install {package} (installed devices: {installed}){self.failed_note()}"
            )
        return self._get("backends", name)

    def conv_template(self, name: str) -> ConvTemplateSpec:
        return self._get("conv_templates", name)

    def model_source(self, name: str) -> ModelSourceSpec:
        return self._get("model_sources", name)

    def model_sources(self) -> list[ModelSourceSpec]:
        self._check()
        return sorted((e.spec for e in self.entries["model_sources"].values()), key=lambda s: -s.priority)

    def backends(self) -> list[BackendSpec]:
        self._check()
        return sorted((e.spec for e in self.entries["backends"].values()), key=lambda s: -s.priority)

    def owner(self, kind: str, name: str) -> str:
        self._check()
        return self.entries[kind][name].plugin

    def resolve_architecture(self, hf_config: Mapping[str, Any]) -> ArchitectureSpec:
        """The architecture serving a Hugging Face ``config.json``."""
        self._check()
        archs = list(hf_config.get("architectures") or [])
        model_type = hf_config.get("model_type")
        for entry in self.entries["architectures"].values():
            if any(a in entry.spec.hf_architectures for a in archs):
                return entry.spec
        for entry in self.entries["architectures"].values():
            if model_type and model_type in entry.spec.hf_model_types:
                return entry.spec
        answer = self.pm.hook.resolve_architecture(hf_config=dict(hf_config))
        if answer:
            return self.architecture(answer)
        wanted = archs[0] if archs else (model_type or "<none given>")
        installed = ", ".join(self.names("architectures")) or "none"
        known = KNOWN_HF_ARCHITECTURES.get(wanted) or (model_type if model_type in KNOWN_ARCHITECTURE_PACKAGES else None)
        package = KNOWN_ARCHITECTURE_PACKAGES[known] if known else (f"kiln-{model_type}" if model_type else "")
        reason = package and self.unavailable_reason(f"architecture '{wanted}'", package)
        if reason:
            raise UnknownNameError(reason)
        if known:
            raise UnknownNameError(
                f"architecture '{wanted}' is not served by any installed plugin: pip install "
                f"{package} (installed architectures: {installed}){self.failed_note()}"
            )
        raise UnknownNameError(
            f"architecture '{wanted}' is not served by any installed plugin (installed architectures: {installed}); "
            f"pass --model-type to choose one, or install a plugin that provides it{self.failed_note()}"
        )

    def failed_plugins(self) -> list[PluginInfo]:
        return [i for i in self.plugins.values() if i.status == "failed"]


def _normalize(distribution: str) -> str:
    """A distribution name as pip compares them (``kiln_Mamba`` == ``kiln-mamba``)."""
    import re

    return re.sub(r"[-_.]+", "-", distribution or "").lower()


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    with _lock:
        if _registry is None:
            pm, infos = create_plugin_manager()
            _registry = Registry.build(pm, infos)
        return _registry


def reset_registry(registry: Registry | None = None) -> None:
    """Forget (or replace) the process-wide registry; used by tests and embedders."""
    global _registry
    with _lock:
        _registry = registry
