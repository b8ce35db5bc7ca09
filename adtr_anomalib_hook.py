"""Start-up hook that imports ``adtr_anomalib`` right after ``anomalib.models`` is imported.

It is run by ``adtr_anomalib.pth`` at every interpreter start, so it must be cheap and harmless: it imports
neither torch nor anomalib, only installs a one-shot import hook, and turns any failure into a warning.
Set ``ADTR_ANOMALIB_NO_AUTOLOAD=1`` to switch it off.
"""

from __future__ import annotations

import importlib
import importlib.abc
import os
import sys
import warnings
from types import ModuleType
from typing import Any

_TARGET = "anomalib.models"
_PLUGIN = "adtr_anomalib"


class _PluginLoader(importlib.abc.Loader):
    """Delegates to anomalib's own loader, then imports the plugin once ``anomalib.models`` is complete."""

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._wrapped.exec_module(module)
        # The import system binds ``anomalib.models`` on its parent only after this returns; the plugin
        # needs that binding now.
        parent, _, child = _TARGET.rpartition(".")
        setattr(sys.modules[parent], child, module)
        if _PLUGIN in sys.modules:  # the plugin is importing anomalib itself; it registers when done
            return
        try:
            importlib.import_module(_PLUGIN)
        except Exception as error:  # noqa: BLE001 - a broken plugin must never break anomalib
            warnings.warn(f"adtr_anomalib could not be loaded, ADTR is unavailable: {error!r}", stacklevel=2)


class _PluginFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of ``anomalib.models`` the first time it is imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        _uninstall()
        spec = None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is not None and (spec := find_spec(fullname, path, target)) is not None:
                break
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PluginLoader(spec.loader)
        return spec


def _uninstall() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _PluginFinder)]


def install() -> None:
    """Install the hook (idempotent); import the plugin now if anomalib.models is already loaded."""
    if os.environ.get("ADTR_ANOMALIB_NO_AUTOLOAD"):
        return
    if _TARGET in sys.modules:
        importlib.import_module(_PLUGIN)
        return
    if not any(isinstance(finder, _PluginFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PluginFinder())


try:
    install()
except Exception as _error:  # noqa: BLE001 - never break interpreter start-up
    warnings.warn(f"adtr_anomalib start-up hook failed: {_error!r}", stacklevel=1)
