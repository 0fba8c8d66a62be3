"""Turnout: a programmable L7 traffic-splitting reverse proxy for progressive delivery."""

import os

__version__ = "0.1.0"

if os.environ.get("TURNOUT_PURE"):
    # Run the modules' sources even where compiled ones are installed (proxy/native.py).
    from .native import prefer_sources

    prefer_sources()
