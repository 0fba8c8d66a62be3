"""Whether the forwarding path runs compiled (mypyc, see setup.py), and whether a
compiled module is older than its source.

A compiled module is imported in preference to its .py file, so after editing
one, rebuild (`make build`, or `pip install -e .`): until then the old code runs.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def build() -> str:
    """ "mypyc" when the forwarding path is compiled, else "python"."""
    from . import forward

    return "mypyc" if (forward.__file__ or "").endswith(_SUFFIXES) else "python"


def stale() -> list[str]:
    """Sources (relative to the package) edited after their compiled module was built."""
    out = []
    for lib in PACKAGE.rglob("*.so"):
        name = lib.name.split(".", 1)[0]
        source = lib.with_name(name + ".py")
        if source.exists() and source.stat().st_mtime > lib.stat().st_mtime:
            out.append(str(source.relative_to(PACKAGE.parent)))
    return sorted(out)
