"""Turnout: a programmable L7 traffic-splitting reverse proxy for progressive delivery."""

__version__ = "0.1.0"
