"""The plugin manager: built-in and third-party plugins registered by one path.

Built-in methods are modules listed in :data:`DEFAULT_PLUGINS`, the built-in command groups
(``registry``, ``serve``) modules listed in :data:`COMMAND_PLUGINS`; third-party plugins are found
through the ``adapterhub`` entry-point group. All are registered with pluggy and asked through the
same hooks (``adapterhub_register_methods``, ``adapterhub_register_commands``, ...). A plugin that
fails to import or register is recorded in :attr:`PluginManager.broken` with its name and error;
the others keep working. The command modules are loaded without the method modules (which import
torch), so building the CLI's parser stays light.

Set ``ADAPTERHUB_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry-point plugins (tests, debugging).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import os
import threading
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import PluginError
from .metadata import peft_method
from .method import Method
from .objective import Objective

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "adapterhub"
DISABLE_AUTOLOAD_ENV = "ADAPTERHUB_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN = "built-in"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "adapterhub.plugins.lora",
    "adapterhub.plugins.qlora",
    "adapterhub.plugins.dora",
    "adapterhub.plugins.adalora",
    "adapterhub.plugins.loraplus",
    "adapterhub.plugins.ia3",
    "adapterhub.plugins.prefix",
    "adapterhub.plugins.prompt",
    "adapterhub.plugins.ptuning",
    "adapterhub.plugins.adapter",
    "adapterhub.plugins.bitfit",
    "adapterhub.plugins.sparse",
    "adapterhub.plugins.freeze",
    "adapterhub.plugins.full",
)

DEFAULT_OBJECTIVES: tuple[str, ...] = (
    "adapterhub.objectives.sft",
    "adapterhub.objectives.preference",
    "adapterhub.objectives.reference_free",
    "adapterhub.objectives.reward",
    "adapterhub.objectives.grpo",
    "adapterhub.objectives.distill",
)

COMMAND_PLUGINS: tuple[str, ...] = (
    "adapterhub.registry.cli",
    "adapterhub.serve.cli",
    "adapterhub.objectives.score_cli",
)


@dataclasses.dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be imported or registered, and why."""

    name: str
    origin: str
    error: str


class PluginManager:
    """Loads plugins lazily and exposes the method table through typed methods."""

    def __init__(self, *, autoload: bool | None = None, builtins: Iterable[str] = DEFAULT_PLUGINS,
                 commands: Iterable[str] = COMMAND_PLUGINS, objectives: Iterable[str] = DEFAULT_OBJECTIVES):
        if autoload is None:
            autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")
        self._autoload = autoload
        self._builtins = tuple(builtins) + tuple(objectives)
        self._command_builtins = tuple(commands)
        self._pm = pluggy.PluginManager("adapterhub")
        self._pm.add_hookspecs(hookspecs)
        self._origins: dict[str, str] = {}  # plugin name -> origin
        self._methods: dict[str, Method] | None = None
        self._objectives: dict[str, Objective] | None = None
        self.broken: list[BrokenPlugin] = []
        self._lock = threading.RLock()
        self._loaded: set[str] = set()  # "methods", "commands", "entry points"

    # -- loading -------------------------------------------------------------------------------

    def _load(self, builtins: str = "methods") -> None:
        """Import and register the ``builtins`` ("methods" or "commands") plugins, then the
        entry-point plugins; each group once."""
        with self._lock:
            if builtins not in self._loaded:
                self._loaded.add(builtins)
                for module_name in self._builtins if builtins == "methods" else self._command_builtins:
                    self._import_and_register(module_name, lambda m=module_name: importlib.import_module(m), BUILTIN)
            if "entry points" not in self._loaded:
                self._loaded.add("entry points")
                for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if self._autoload else ():
                    dist = ep.dist.name if ep.dist is not None else ep.value
                    self._import_and_register(ep.name, ep.load, dist)

    def _impls(self, hook: Any) -> list[Any]:
        """A hook's implementations: built-in plugins first (whatever loaded first), each group in
        the order registered."""
        return sorted(hook.get_hookimpls(), key=lambda impl: self._origins.get(impl.plugin_name, BUILTIN) != BUILTIN)

    def _import_and_register(self, name: str, loader: Any, origin: str) -> None:
        if self._pm.has_plugin(name):
            return
        try:
            plugin = loader()
            self._pm.register(plugin, name=name)
        except Exception as exc:  # a broken plugin must not take the others down
            self._record_broken(name, origin, exc)
            return
        self._origins[name] = origin

    def _record_broken(self, name: str, origin: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        log.warning("adapterhub plugin %r (%s) is broken: %s", name, origin, message)
        self.broken.append(BrokenPlugin(name=name, origin=origin, error=message))

    def register(self, plugin: Any, name: str, origin: str = "test") -> None:
        """Register a plugin object by hand (tests, embedding); the method table is rebuilt."""
        with self._lock:
            self._load()
            self._pm.register(plugin, name=name)
            self._origins[name] = origin
            self._methods = self._objectives = None

    def unregister(self, name: str) -> None:
        with self._lock:
            self._pm.unregister(name=name)
            self._origins.pop(name, None)
            self.broken = [b for b in self.broken if b.name != name]
            self._methods = self._objectives = None

    # -- the method table ----------------------------------------------------------------------

    def methods(self) -> dict[str, Method]:
        """All registered methods by name (built-ins first, then third-party)."""
        with self._lock:
            self._load()
            if self._methods is None:
                self._methods = self._collect(self._pm.hook.adapterhub_register_methods, Method, "method")
            return dict(self._methods)

    def objectives(self) -> dict[str, Objective]:
        """All registered training objectives by name (built-ins first, then third-party)."""
        with self._lock:
            self._load()
            if self._objectives is None:
                self._objectives = self._collect(self._pm.hook.adapterhub_register_objectives, Objective, "objective")
            return dict(self._objectives)

    def _collect(self, hook: Any, kind: type, label: str) -> dict[str, Any]:
        """One registration hook's table; each implementation is called on its own so that one
        failing plugin is isolated, and a taken name is reported (the first registration wins)."""
        table: dict[str, Any] = {}
        failed = f"{label} registration failed"
        self.broken = [b for b in self.broken if not b.error.startswith(failed)]
        for impl in self._impls(hook):
            origin = self._origins.get(impl.plugin_name, BUILTIN)
            collected: list[Any] = []

            def register(item: Any, _into: list = collected) -> None:
                if not isinstance(item, kind):
                    raise PluginError(f"register() expects an adapterhub.{kind.__name__}, got {type(item).__name__}")
                if not item.name:
                    raise PluginError(f"{type(item).__name__} has an empty name")
                _into.append(item)

            try:
                impl.function(register=register)
            except Exception as exc:
                self.broken.append(BrokenPlugin(impl.plugin_name, origin, f"{failed}: {type(exc).__name__}: {exc}"))
                continue
            for item in collected:
                if item.name in table:
                    self.broken.append(BrokenPlugin(
                        impl.plugin_name, origin,
                        f"{failed}: {label} name {item.name!r} is already provided by {table[item.name].origin}"))
                    continue
                item.origin = origin
                table[item.name] = item
        return table

    def get_objective(self, name: str) -> Objective:
        """The objective called ``name``; a clear error lists what exists (and what is broken)."""
        objectives = self.objectives()
        if name in objectives:
            return objectives[name]
        broken = [b for b in self.broken if b.name == name]
        hint = f"; plugin {name!r} is installed but broken: {broken[0].error}" if broken else ""
        raise PluginError(f"unknown objective {name!r}; available: {', '.join(sorted(objectives))}{hint} "
                          "(see `adapterhub objectives`)")

    def get_method(self, name: str) -> Method:
        """The method called ``name``; a clear error lists what exists (and what is broken)."""
        methods = self.methods()
        if name in methods:
            return methods[name]
        hint = ""
        broken = [b for b in self.broken if b.name == name]
        if broken:
            hint = f"; plugin {name!r} is installed but broken: {broken[0].error}"
        raise PluginError(
            f"unknown method plugin {name!r}; available: {', '.join(sorted(methods))}{hint}. "
            "Install a plugin package that provides it, or check the spelling."
        )

    def peft_formats(self) -> dict[tuple[str, str | None], str]:
        """``(peft_type, variant flag) -> method name``, from the methods' own ``peft_type`` and
        ``peft_variant``; the first method registered for a format reads plain PEFT dirs of it."""
        formats: dict[tuple[str, str | None], str] = {}
        for method in self.methods().values():
            if method.peft_type:
                formats.setdefault((method.peft_type, method.peft_variant), method.name)
        return formats

    def method_for_peft_config(self, config: dict[str, Any]) -> Method | None:
        """The method that reads a plain PEFT adapter with this ``adapter_config.json``."""

        name = peft_method(config, self.peft_formats())
        return self.get_method(name) if name else None

    def register_commands(self, subparsers: Any) -> None:
        """Every plugin's ``adapterhub_register_commands`` on the CLI's ``subparsers``: the built-in
        groups first, then third-party ones, each in the order registered. A plugin whose hook
        raises (a name already taken, say) is recorded as broken; the others' commands stay."""
        self._load("commands")
        for impl in self._impls(self._pm.hook.adapterhub_register_commands):
            try:
                impl.function(subparsers=subparsers)
            except Exception as exc:
                broken = BrokenPlugin(impl.plugin_name, self._origins.get(impl.plugin_name, BUILTIN),
                                      f"registering commands failed: {type(exc).__name__}: {exc}")
                log.warning("adapterhub plugin %r (%s) is broken: %s", broken.name, broken.origin, broken.error)
                if broken not in self.broken:
                    self.broken.append(broken)

    def trainer_callbacks(self, method: Method, options: Any) -> list[Any]:
        """Callbacks from every plugin's ``adapterhub_trainer_callbacks`` hook, concatenated."""
        self._load()
        results = self._pm.hook.adapterhub_trainer_callbacks(method=method, options=options)
        return [cb for result in results if result for cb in result]


_manager: PluginManager | None = None
_manager_lock = threading.Lock()


def get_manager() -> PluginManager:
    """The process-wide plugin manager (created on first use, never at import)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = PluginManager()
        return _manager


def reset_manager(manager: PluginManager | None = None) -> None:
    """Replace the process-wide manager (tests)."""
    global _manager
    with _manager_lock:
        _manager = manager
