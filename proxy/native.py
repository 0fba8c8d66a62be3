"""Whether the forwarding path runs compiled (mypyc, see setup.py), whether a
compiled module is older than its source, and running the sources instead.

A compiled module is imported in preference to its .py file, so after editing
one, rebuild (`make build`, or `pip install -e .`): until then the old code runs.
With TURNOUT_PURE=1 in the environment, `proxy` imports its sources even where
compiled modules are installed (see proxy/__init__.py): the pure build, for
tests of it and for debugging, in the same tree.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parent
_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def build() -> str:
    """ "mypyc" when the forwarding path is compiled, else "python"."""
    forward = sys.modules.get(__package__ + ".forward")
    if forward is None:  # not imported yet: where it would be found
        spec = importlib.util.find_spec(__package__ + ".forward")
        origin = spec.origin if spec is not None else None
    else:
        origin = forward.__file__
    return "mypyc" if (origin or "").endswith(_SUFFIXES) else "python"


def stale() -> list[str]:
    """Sources (relative to the package) edited after their compiled module was built."""
    out = []
    for lib in PACKAGE.rglob("*.so"):
        name = lib.name.split(".", 1)[0]
        source = lib.with_name(name + ".py")
        if source.exists() and source.stat().st_mtime > lib.stat().st_mtime:
            out.append(str(source.relative_to(PACKAGE.parent)))
    return sorted(out)


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Finds proxy.* modules by their .py file, ahead of compiled ones."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if not name.startswith("proxy.") or path is None:
            return None
        leaf = name.rpartition(".")[2] + ".py"
        for folder in path:
            source = Path(folder) / leaf
            if source.is_file():
                return importlib.util.spec_from_file_location(name, source)
        return None  # a package, or not ours: the usual finders


def prefer_sources() -> None:
    if not any(isinstance(f, _SourcesFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourcesFirst())
