"""The plugin manager: entry-point group ``kiln``, one plugin's failure isolated from the rest.

``create_plugin_manager()`` builds a fresh :class:`pluggy.PluginManager` (nothing happens at
import time).  It registers kiln's own built-in plugins, then loads every entry point of the
``kiln`` group on its own, so that a plugin that fails to import, or implements a hook that does
not exist (a misspelling), is recorded as failed and left out while the others work.
``KILN_DISABLE_PLUGINS=a,b`` blocks plugins by entry-point name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .errors import did_you_mean

ENTRY_POINT_GROUP = "kiln"

# kiln's own plugins, registered without entry points so the core always has them.
BUILTIN_PLUGINS = (
    ("kiln.quantization", "kiln.quantization.builtin"),
    ("kiln.conv_templates", "kiln.runtime.conv_templates"),
    ("kiln.sources", "kiln.sources.builtin"),
)


@dataclass
class PluginInfo:
    """What kiln knows about one plugin, for ``kiln plugins``."""

    name: str
    distribution: str = ""
    version: str = ""
    module: str = ""
    status: str = "loaded"  # loaded | failed | disabled
    error: str = ""
    registered: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "status": self.status,
            "error": self.error,
            "registered": self.registered,
        }


def disabled_plugins() -> set[str]:
    raw = os.environ.get("KILN_DISABLE_PLUGINS", "")
    return {p.strip() for p in raw.replace(";", ",").split(",") if p.strip()}


def _entry_points():
    try:
        from importlib.metadata import entry_points
    except ImportError:  # pragma: no cover - Python < 3.10
        from importlib_metadata import entry_points
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _unknown_hooks(pm: pluggy.PluginManager, plugin) -> list[str]:
    """Hook implementations of ``plugin`` that match no hook specification."""
    known = {name for name in dir(hookspecs) if not name.startswith("_")}
    bad = []
    for name in dir(plugin):
        if name.startswith("_"):
            continue
        attr = getattr(plugin, name, None)
        if attr is not None and pm.parse_hookimpl_opts(plugin, name) is not None:
            if not hasattr(pm.hook, name) or not getattr(pm.hook, name).has_spec():
                bad.append(name + did_you_mean(name, known))
    return bad


def _register(pm: pluggy.PluginManager, plugin, info: PluginInfo, infos: dict[str, PluginInfo]):
    try:
        pm.register(plugin, name=info.name)
    except Exception as exc:  # noqa: BLE001 - pluggy raises ValueError for duplicate names
        info.status, info.error = "failed", f"could not register: {exc}"
        infos[info.name] = info
        return
    unknown = _unknown_hooks(pm, plugin)
    if unknown:
        pm.unregister(plugin)
        info.status = "failed"
        info.error = "implements unknown hook(s): " + ", ".join(unknown)
    infos[info.name] = info


def create_plugin_manager(load_entry_points: bool = True, extra_plugins=()) -> tuple[pluggy.PluginManager, dict[str, PluginInfo]]:
    """Create kiln's plugin manager.

    Returns the manager and a ``{plugin name: PluginInfo}`` map recording every plugin seen,
    including the ones that failed or were disabled.  ``extra_plugins`` are ``(name, object)``
    pairs registered after the entry points (tests and embedding applications use it).
    """
    import importlib

    from . import __version__

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    blocked = disabled_plugins()

    for name, module_name in BUILTIN_PLUGINS:
        info = PluginInfo(name=name, distribution="kiln", version=__version__, module=module_name)
        if name in blocked:
            info.status = "disabled"
            infos[name] = info
            continue
        _register(pm, importlib.import_module(module_name), info, infos)

    if load_entry_points:
        for ep in _entry_points():
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                distribution=getattr(dist, "name", "") or "",
                version=getattr(dist, "version", "") or "",
                module=ep.value,
            )
            if ep.name in infos and infos[ep.name].status != "failed":
                info.status = "failed"
                info.error = f"plugin name '{ep.name}' is already taken by {infos[ep.name].distribution or 'kiln'}"
                infos[f"{ep.name} ({info.distribution})"] = info
                continue
            if ep.name in blocked:
                info.status = "disabled"
                infos[ep.name] = info
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure isolates this plugin
                info.status = "failed"
                info.error = f"{type(exc).__name__}: {exc}".strip()
                infos[ep.name] = info
                continue
            _register(pm, plugin, info, infos)

    for name, plugin in extra_plugins:
        info = PluginInfo(name=name, module=getattr(plugin, "__name__", type(plugin).__name__))
        _register(pm, plugin, info, infos)

    # Every plugin with an unknown hook was taken out above; what is left must validate.
    pm.check_pending()
    return pm, infos
