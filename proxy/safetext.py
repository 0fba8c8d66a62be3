"""Untrusted text on its way to a terminal, a log line or the audit file.

Rules:
- `escape(text)` writes every control character as its Python escape: C0
  (`\\n` `\\r` `\\t` `\\x1b` ...), DEL and C1 (`\\x7f`, `\\x9b`), the Unicode line
  and paragraph separators and the bidirectional overrides (`\\u2028`,
  `\\u202e`); a backslash is doubled, so an escaped text never reads as another
  one. Everything else (accents, CJK, emoji) is kept as it is. The result is
  one line that cannot move the cursor, recolour a terminal or forge a log line.
- `EscapingFilter` escapes the str arguments of every log record before the
  message is formatted; the format strings are the code's own and stay as
  they are (tracebacks too).
"""

from __future__ import annotations

import logging
import re

_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _one(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _NAMED:
        return _NAMED[ch]
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def escape(text: str) -> str:
    """`text` with control characters escaped (see the module's rules)."""
    return _UNSAFE.sub(_one, text) if _UNSAFE.search(text) else text


def escape_all(value: object) -> object:
    """Escape a str, or the strs inside a list, tuple or dict (JSON-shaped data)."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, list | tuple):
        return [escape_all(v) for v in value]
    if isinstance(value, dict):
        return {escape(str(k)): escape_all(v) for k, v in value.items()}
    return value


class EscapingFilter(logging.Filter):
    """Escapes the str arguments of each record (install it on a handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "turnout_escaped", False):
            return True  # another handler's filter did it: escape once
        record.turnout_escaped = True
        if isinstance(record.args, tuple):
            record.args = tuple(escape(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: escape(v) if isinstance(v, str) else v
                           for k, v in record.args.items()}  # fmt: skip
        return True
