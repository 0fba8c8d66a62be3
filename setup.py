"""Build hook: the forwarding path's modules are compiled with mypyc.

mypyc turns these modules' own type-annotated Python into a C extension: the
same source and behaviour, several times less interpreter work per request
(see README, "Design"). Set TURNOUT_PURE=1 to install pure Python (no C
compiler needed; every feature works, at a fraction of the throughput).
Everything else about the package lives in pyproject.toml.
"""

import os

from setuptools import setup

# The modules every request passes through, and what they call per request.
COMPILED = [
    "proxy/http/downstream.py",
    "proxy/http/h2.py",
    "proxy/http/reading.py",
    "proxy/http/upstream.py",
    "proxy/http/h2up.py",
    "proxy/http/h2wire.py",
    "proxy/http/pools.py",
    "proxy/http/outbox.py",
    "proxy/http/parts.py",
    "proxy/shared.py",
    "proxy/phases.py",
    "proxy/answers.py",
    "proxy/leg.py",
    "proxy/forward.py",
    "proxy/headers.py",
    "proxy/framing.py",
    "proxy/routing.py",
    "proxy/metrics.py",
    "proxy/mirror.py",
    "proxy/compare.py",
    "proxy/accesslog.py",
]


def ext_modules() -> list:
    if os.environ.get("TURNOUT_PURE"):
        return []
    from mypyc.build import mypycify

    # Third-party modules are typed as Any whether or not they are installed yet,
    # so a build compiles the same code in a fresh environment and an old one.
    return mypycify(
        ["--ignore-missing-imports", "--no-site-packages", *COMPILED],
        opt_level="3",
        group_name="turnout_native",
    )


setup(ext_modules=ext_modules())
