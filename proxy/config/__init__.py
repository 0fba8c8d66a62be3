"""The config file: YAML in, frozen dataclasses out.

Rules:
- `load(path)` returns a `Config` or raises `ConfigError` carrying *every* problem
  found, each with its dotted key path and the line it sits on; nothing a file
  holds makes it raise anything else.
- Unknown keys are errors: a typo must never pass silently.
- Nothing here does network I/O; reading cohort files is the only file I/O
  besides the config itself.
- This package's names are the API: the rest of the program imports from
  `proxy.config`, never from a module inside it.

The modules, each with its own rules, depend on each other in this order only:
- `model`: the frozen dataclasses and the constants the program reads (no YAML);
- `walker`: problems, limits, digests, and walking YAML nodes through tables;
- `values`: the parsers of one value (durations, sizes, names, URLs, lists);
- `parsers`: the parsers of each section and their key -> parser tables;
- `loader`: `load`, `parse`, the top-level table and the checks across sections.
"""

from __future__ import annotations

from .certs import PairError, load_pair
from .loader import SECTIONS, load, parse
from .model import (
    COMPARED_BY_DEFAULT,
    MAX_COHORT_BYTES,
    MAX_CONFIG_BYTES,
    NEVER_COMPARED,
    NEVER_COMPARED_PREFIX,
    VIEWER,
    AccessLogConfig,
    Admin,
    Certificate,
    Compare,
    Config,
    Endpoint,
    Http2,
    Limits,
    Match,
    Mirror,
    RolloutConfig,
    Routing,
    Rule,
    StateBackend,
    Step,
    Sticky,
    Tls,
    Token,
    UpstreamTls,
    Version,
)
from .walker import MAX_DEPTH, ConfigError, Problem, digest, file_digest, render_problems

__all__ = [
    "COMPARED_BY_DEFAULT",
    "MAX_COHORT_BYTES",
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "NEVER_COMPARED",
    "NEVER_COMPARED_PREFIX",
    "SECTIONS",
    "VIEWER",
    "AccessLogConfig",
    "Admin",
    "Certificate",
    "Compare",
    "Config",
    "ConfigError",
    "Endpoint",
    "Http2",
    "Limits",
    "Match",
    "Mirror",
    "PairError",
    "Problem",
    "RolloutConfig",
    "Routing",
    "Rule",
    "StateBackend",
    "Step",
    "Sticky",
    "Tls",
    "Token",
    "UpstreamTls",
    "Version",
    "digest",
    "file_digest",
    "load",
    "load_pair",
    "parse",
    "render_problems",
]
