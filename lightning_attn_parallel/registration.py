"""Register the strategy name "attn_hybrid" with Lightning (Trainer and Fabric) without importing Lightning early.

Importing Lightning takes seconds; the command line reads and checks its config before it
needs Lightning, and answers sooner for it. So importing the package registers the name at once
when Lightning is already loaded, and otherwise as soon as `import lightning` (or any of its
submodules) has finished, through an import hook: the README's promise, "the import registers the
strategy name", holds in either order of imports. Python has no post-import hook of its own
(PEP 369 was withdrawn), hence the small finder below.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any, Optional


def _register_now() -> None:
    """Import both front-ends' strategy modules; each registers its name as its last statement.
    A module still being imported (Lightning was loaded by its own imports) registers when it
    finishes, so this is safe in any import order."""
    for name in ("strategy", "fabric"):
        importlib.import_module(f".{name}", __package__)


class _AfterLightningLoads(importlib.abc.MetaPathFinder):
    """Wraps the loader of the top-level `lightning` package: once its `__init__` (which
    imports all of Lightning) has run, the strategy registers."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Optional[Any]:
        if name != "lightning":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                sys.meta_path.remove(self)
                execute = spec.loader.exec_module

                def exec_module(module: Any) -> None:
                    execute(module)
                    _register_now()

                spec.loader.exec_module = exec_module
                return spec
        return None


def register_when_lightning_loads() -> None:
    """Register now if Lightning is loaded, else right after it loads."""
    if "lightning" in sys.modules and "lightning.pytorch.strategies" in sys.modules:
        _register_now()
    elif not any(isinstance(f, _AfterLightningLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterLightningLoads())


__all__ = ["register_when_lightning_loads"]
