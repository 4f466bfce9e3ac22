"""Plugin discovery and lookup.

Every plugin, builtin or third-party, comes in through the ``loopsearch`` entry-point group.
A plugin that fails to import is recorded (name and error) and the others still load.
``LOOPSEARCH_PLUGINS`` (comma-separated entry-point or distribution names) restricts which
third-party plugins load; the builtins always load. Set it to an empty string to load none.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .errors import UnknownPluginError

log = logging.getLogger("loopsearch")
GROUP = "loopsearch"
BUILTIN_DIST = "loopsearch"
ENV_FILTER = "LOOPSEARCH_PLUGINS"

KINDS = {
    "backbone": "register_backbones",
    "loop_strategy": "register_loop_strategies",
    "sampler": "register_samplers",
    "corpus": "register_corpora",
    "exit_criterion": "register_exit_criteria",
    "search_space": "register_search_spaces",
    "study_recipe": "register_study_recipes",
}
FILE_KINDS = ("search_space", "study_recipe")


@dataclass
class PluginInfo:
    name: str
    kind: str
    obj: Any
    plugin: str  # entry-point (or registration) name of the module that registered it
    distribution: str
    version: str

    def params_schema(self) -> dict:
        params = getattr(self.obj, "Params", None)
        if params is None:
            return {}
        props = params.model_json_schema().get("properties", {})
        return {k: {kk: v[kk] for kk in ("type", "default", "enum", "description") if kk in v}
                for k, v in props.items()}


@dataclass
class PluginFailure:
    plugin: str
    distribution: str
    error: str


@dataclass
class Registry:
    pm: pluggy.PluginManager = field(default_factory=lambda: _new_manager())
    failures: list[PluginFailure] = field(default_factory=list)
    _dists: dict[str, tuple[str, str]] = field(default_factory=dict)
    _items: dict[str, dict[str, PluginInfo]] | None = None

    # ---- loading -------------------------------------------------------------------------
    def register(self, module: Any, name: str, distribution: str = "<local>", version: str = "") -> None:
        """Register a plugin module/object directly (tests and notebooks use this)."""
        self.pm.register(module, name=name)
        self._dists[name] = (distribution, version)
        self._items = None

    def load_entrypoints(self) -> None:
        allowed = _allowed_plugins()
        for ep in sorted(md.entry_points(group=GROUP), key=lambda e: (_dist_name(e) != BUILTIN_DIST, e.name)):
            dist = _dist_name(ep)
            version = ep.dist.version if ep.dist is not None else ""
            if self.pm.has_plugin(ep.name) or self.pm.is_blocked(ep.name):
                continue
            if dist != BUILTIN_DIST and allowed is not None and not ({ep.name, dist} & allowed):
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self.failures.append(PluginFailure(ep.name, dist, f"{type(exc).__name__}: {exc}"))
                log.warning("plugin %s (%s) failed to load and is skipped: %s: %s "
                            "(see `loopsearch plugins list`)", ep.name, dist, type(exc).__name__, exc)
                continue
            self.register(module, ep.name, dist, version)

    # ---- lookup --------------------------------------------------------------------------
    def items(self, kind: str) -> dict[str, PluginInfo]:
        if self._items is None:
            self._items = self._collect()
        return self._items[kind]

    def get(self, kind: str, name: str) -> Any:
        found = self.items(kind)
        if name not in found:
            raise UnknownPluginError(kind.replace("_", " "), name, list(found))
        return found[name].obj

    def params(self, kind: str, name: str, params: Any = None, where: str = "") -> Any:
        """The plugin's validated ``Params`` (an instance of its pydantic model; a plugin without
        one gets ``params`` back as a dict). One error format for every kind: SpecError
        "bad parameters for KIND 'NAME' [in WHERE]: key: problem (accepted: ...)"."""
        from pydantic import BaseModel, ValidationError

        from .errors import SpecError

        cls = self.get(kind, name)
        model = getattr(cls, "Params", None)
        if isinstance(params, BaseModel):
            params = params.model_dump()
        if model is None:
            return dict(params or {})
        try:
            return model.model_validate(params or {})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']} (got {e.get('input')!r})"
                                 for e in exc.errors())
            accepted = ", ".join(model.model_fields) or "none"
            context = f" in {where}" if where else ""
            raise SpecError(f"bad parameters for {kind.replace('_', ' ')} {name!r}{context}: {problems} "
                            f"(accepted: {accepted})") from None

    def build(self, kind: str, name: str, params: Any = None, *args: Any, where: str = "", **kwargs: Any) -> Any:
        """The one place a plugin is instantiated from its registry entry: look it up, validate
        ``params`` against its ``Params`` and call ``cls(validated, *args, **kwargs)``."""
        return self.get(kind, name)(self.params(kind, name, params, where), *args, **kwargs)

    def all(self) -> list[PluginInfo]:
        return [info for kind in KINDS for info in self.items(kind).values()]

    def _collect(self) -> dict[str, dict[str, PluginInfo]]:
        out: dict[str, dict[str, PluginInfo]] = {k: {} for k in KINDS}
        for kind, hook in KINDS.items():
            # get_hookimpls() is in registration order, builtins first: the first name registered wins
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                dist, version = self._dists.get(impl.plugin_name, ("<local>", ""))
                try:
                    things = list(impl.function() or [])
                except Exception as exc:
                    self.failures.append(PluginFailure(impl.plugin_name, dist, f"{hook}: {type(exc).__name__}: {exc}"))
                    continue
                for obj in things:
                    name = _name_of(kind, obj)
                    if name in out[kind]:
                        prev = out[kind][name]
                        self.failures.append(PluginFailure(
                            impl.plugin_name, dist,
                            f"{kind} {name!r} is already registered by {prev.distribution}; ignored"))
                        continue
                    out[kind][name] = PluginInfo(name, kind, obj, impl.plugin_name, dist, version)
        return out


def _name_of(kind: str, obj: Any) -> str:
    if kind in FILE_KINDS:
        return Path(str(getattr(obj, "name", obj))).stem
    return obj.name


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("loopsearch")
    pm.add_hookspecs(hookspecs)
    return pm


def _dist_name(ep: md.EntryPoint) -> str:
    return ep.dist.metadata["Name"] if ep.dist is not None else "<unknown>"


def _allowed_plugins() -> set[str] | None:
    raw = os.environ.get(ENV_FILTER)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        reg = Registry()
        reg.load_entrypoints()
        _REGISTRY = reg
    return _REGISTRY


def set_registry(reg: Registry | None) -> None:
    """Replace the process-wide registry (tests); None reloads from entry points on next use."""
    global _REGISTRY
    _REGISTRY = reg
