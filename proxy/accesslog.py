"""The access log's records and their JSON lines (PRODUCT.md section 15).

Rules:
- The hot path only appends one tuple of the exchange's raw values to a list
  (`AccessLog.record`); turning them into text happens later, in batches
  (proxy.accessfile), so a request pays for no formatting, no clock reading
  and no system call.
- The list is bounded: past `limit` records waiting, new ones are dropped and
  counted, never allowed to grow memory without end or to block.
- Every line is one JSON object on one line, ASCII only. Strings that come
  from the client (method, path) are written as received when they are plain
  printable ASCII; otherwise bytes outside it are percent-encoded (as a URL
  would carry them) and quotes and backslashes are escaped, so no request can
  break a line or forge a field. A target is cut at TARGET_MAX bytes and a
  method at METHOD_MAX, so a line stays short whatever max_header_bytes
  allows, and a record holds no more of the request than its line shows.
"""

from __future__ import annotations

import json
import re
import time
from typing import Final

# (start, end, client, method, target, status, route, bytes_in, bytes_out, pool,
#  error kind, shadow): the clock readings are time.monotonic(); see AccessLog.record.
Record = tuple[
    float, float, str, bytes | None, bytes | None, int, object, int, int, object,
    str | None, bool,
]  # fmt: skip

REFUSED: Final = (None, None)  # the route of a request refused before routing

PENDING_MAX: Final = 65536  # records kept between two flushes; then dropped and counted
NAMES_MAX: Final = 4096  # encodings the formatter remembers; then it starts afresh
REMEMBERED_MAX: Final = 256  # targets longer than this are encoded each time
# A target (its text, once escaped) and a method are cut here, so that a line stays
# shorter than PIPE_BUF (4096 bytes: what the kernel writes to a pipe whole).
TARGET_MAX: Final = 2048
METHOD_MAX: Final = 32


class AccessLog:
    """Records of finished exchanges waiting for the writer; one per process."""

    def __init__(self, limit: int = PENDING_MAX) -> None:
        self.pending: list[Record] = []
        self.limit = limit
        self.dropped = 0  # records refused because `pending` was full (the loop's count)
        self.write_dropped = 0  # lines the writer could not write (the writer's count)

    def record(
        self,
        start: float,
        end: float,
        client: str,
        method: bytes | None,
        target: bytes | None,
        status: int,
        route: object,
        bytes_in: int,
        bytes_out: int,
        pool: object,
        error: str | None,
        shadow: bool,
    ) -> None:
        """One exchange is over.

        `route` names the version and the reason: the routing decision (its
        `version` and `reason`), or a (version, reason) tuple. `pool`: the pool of
        the endpoint it went to (its `endpoint.key` is written), or None. Both are
        kept as they are, so that the formatter finds their encoding by identity.
        """
        pending = self.pending
        if len(pending) >= self.limit:
            self.dropped += 1
            return
        # What a client sent is kept only as far as the line shows it.
        if target is not None and len(target) > TARGET_MAX:
            target = target[: TARGET_MAX + 1]  # one byte more: the line shows it was cut
        if method is not None and len(method) > METHOD_MAX:
            method = method[:METHOD_MAX]
        pending.append(
            (start, end, client, method, target, status, route, bytes_in, bytes_out, pool,
             error, shadow)
        )  # fmt: skip

    def take(self) -> list[Record]:
        """The records so far, handed over whole; the log starts a new list."""
        batch = self.pending
        self.pending = []
        return batch

    def lost(self) -> int:
        return self.dropped + self.write_dropped


# -- formatting (the writer's thread) ---------------------------------------------------

_PLAIN: Final = re.compile(rb"[\x21\x23-\x5b\x5d-\x7e]*")  # printable ASCII but " and \


def quoted_bytes(raw: bytes | None) -> bytes:
    """`raw` as a JSON string: see the module's rules."""
    if raw is None:
        return b"null"
    if _PLAIN.fullmatch(raw) is not None:
        return b'"%b"' % raw
    out = bytearray(b'"')
    for byte in raw:
        if byte == 0x22 or byte == 0x5C:
            out += b"\\%c" % byte
        elif 0x21 <= byte <= 0x7E:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    out += b'"'
    return bytes(out)


class Formatter:
    """Turns records into lines. What repeats from line to line is encoded once and
    remembered, apart by kind so that one kind's churn (routes under
    `anonymous: cookie`, say) never evicts another's: clients, routes (by the
    decision, then by its version and reason), endpoints, errors, methods and
    short targets, status codes, and the clock's millisecond."""

    def __init__(self) -> None:
        self.clients: dict[str, bytes] = {}
        self.routes: dict[object, bytes] = {}
        self.route_names: dict[tuple[object, object], bytes] = {}
        self.pools: dict[object, bytes] = {}
        self.errors: dict[str | None, bytes] = {None: b"null"}
        self.targets: dict[bytes | None, bytes] = {None: b"null"}
        self.codes: dict[int, bytes] = {}
        self.millisecond = -1
        self.stamp = b""

    def client(self, value: str) -> bytes:
        found = self.clients.get(value)
        if found is None:
            found = _remember(self.clients, value, _json(value))
        return found

    def error(self, value: str | None) -> bytes:
        found = self.errors.get(value)
        if found is None:
            found = _remember(self.errors, value, _json(value))
        return found

    def pool(self, value: object) -> bytes:
        """An upstream pool: its endpoint's host:port (duck-typed: this module is
        below proxy.http.upstream)."""
        found = self.pools.get(value)
        if found is None:
            key = None if value is None else getattr(value, "endpoint").key  # noqa: B009
            found = _remember(self.pools, value, _json(key))
        return found

    def route(self, value: object) -> bytes:
        """The "version" and "reason" fields of a routing decision or a tuple."""
        found = self.routes.get(value)
        if found is None:
            if isinstance(value, tuple):
                version, reason = value
            else:  # a routing decision (duck-typed: this module is below proxy.routing)
                version, reason = getattr(value, "version"), getattr(value, "reason")  # noqa: B009
            names = (version, reason)
            found = self.route_names.get(names)
            if found is None:
                found = b'"version":%b,"reason":%b' % (_json(version), _json(reason))
                _remember(self.route_names, names, found)
            _remember(self.routes, value, found)
        return found

    def target(self, raw: bytes | None) -> bytes:
        """quoted_bytes(raw), its text cut at TARGET_MAX bytes (then ending "...");
        short ones are remembered (most traffic asks for a few paths)."""
        found = self.targets.get(raw)
        if found is None:
            found = quoted_bytes(raw)
            if len(found) > TARGET_MAX + 2:
                body = found[1 : TARGET_MAX + 1]
                backslashes = len(body) - len(body.rstrip(b"\\"))
                if backslashes % 2:  # do not cut an escape in two
                    body = body[:-1]
                found = b'"%b..."' % body
            if raw is not None and len(raw) <= REMEMBERED_MAX:
                _remember(self.targets, raw, found)
        return found

    def code(self, status: int) -> bytes:
        found = self.codes.get(status)
        if found is None:
            found = self.codes[status] = b"%d" % status if status else b"null"
        return found

    def time(self, wall: float) -> bytes:
        """RFC 3339 in UTC, to the millisecond."""
        millisecond = int(wall * 1000.0)
        if millisecond != self.millisecond:
            self.millisecond = millisecond
            second, ms = divmod(millisecond, 1000)
            day = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
            self.stamp = b"%b.%03dZ" % (day, ms)
        return self.stamp

    def lines(self, batch: list[Record], start: int, stop: int, offset: float) -> bytes:
        """The lines of batch[start:stop]; `offset`: wall-clock seconds minus monotonic
        seconds, now."""
        out: list[bytes] = []
        target = self.target
        for i in range(start, stop):
            (began, end, client, method, path, status, route, bytes_in, bytes_out, pool,
             error, shadow) = batch[i]  # fmt: skip
            out.append(
                b'{"time":"%b","client":%b,"method":%b,"path":%b,"status":%b,%b,'
                b'"bytes_in":%d,"bytes_out":%d,"duration_ms":%.3f,"upstream":%b,'
                b'"shadow":%b,"error":%b}\n'
                % (
                    self.time(began + offset), self.client(client), target(method),
                    target(path), self.code(status), self.route(route), bytes_in, bytes_out,
                    (end - began) * 1000.0, self.pool(pool), b"true" if shadow else b"false",
                    self.error(error),
                )
            )  # fmt: skip
        return b"".join(out)


def _remember(cache: dict, key: object, value: bytes) -> bytes:
    if len(cache) >= NAMES_MAX:
        cache.clear()
    cache[key] = value
    return value


def _json(value: object) -> bytes:
    return b"null" if value is None else json.dumps(str(value)).encode()
