"""What both ends of the proxy's HTTP/2 connections share (proxy.http.h2 to clients,
proxy.http.h2up to upstreams): the `h2` state machine, and the writing of what it
prepared.

Rules:
- The heads the proxy sends are its own (names in lower case, no hop-by-hop
  fields: proxy.http.parts), so h2's checks of outbound heads are skipped; every
  check of what the peer sends stays on.
- What h2 prepares is written once per turn of the loop (`later`), after what the
  outbox holds for the same turn (proxy.http.outbox).
- Data goes out within the peer's windows, in frames of its largest size, the last
  carrying END_STREAM when asked; a stream h2 no longer takes data on is reported
  (-1), never raised.
"""

from __future__ import annotations

import asyncio

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import ProtocolError, StreamClosedError

from .outbox import flush


class H2Wire:
    __slots__ = ("h2", "transport", "closed", "pumping")

    def __init__(self, client_side: bool) -> None:
        config = H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = H2Connection(config=config)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.closed = False
        self.pumping = False  # a write of what h2 prepared is queued for this turn's end

    def send_within(self, sid: int, out: bytearray, last: bool) -> int:
        """Send as much of `out` as the windows allow, END_STREAM with its last byte when
        `last` and all of it goes; how much was sent, or -1 when the stream is gone."""
        h2 = self.h2
        size = len(out)
        try:
            room = min(h2.local_flow_control_window(sid), size)
            frame = h2.max_outbound_frame_size
            sent = 0
            while sent < room:
                n = min(frame, room - sent)
                end = last and sent + n == size
                h2.send_data(sid, bytes(out[sent : sent + n]), end_stream=end)
                sent += n
        except (StreamClosedError, ProtocolError):
            return -1
        if sent:
            self.later()
        return sent

    def reset_sid(self, sid: int, code: int) -> None:
        """RST_STREAM with `code`, unless the stream is gone already."""
        try:
            self.h2.reset_stream(sid, code)
        except (StreamClosedError, ProtocolError):
            return
        self.later()

    def acknowledge(self, sid: int, flow: int) -> None:
        """Reopen the peer's windows by `flow` bytes read (the connection's alone, when
        the stream is gone)."""
        if flow:
            try:
                self.h2.acknowledge_received_data(flow, sid)
            except (StreamClosedError, ProtocolError):
                pass
            self.later()

    def later(self) -> None:
        """Write what h2 prepared at the end of this turn (once, whatever was prepared)."""
        if not self.pumping and not self.closed:
            self.pumping = True
            asyncio.get_running_loop().call_soon(self.pump)

    def pump(self) -> None:
        self.pumping = False
        data = self.h2.data_to_send()
        if data and not self.closed and not self.transport.is_closing():
            flush()  # what the outbox holds for this transport goes first
            self.transport.write(data)
