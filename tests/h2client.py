"""An HTTP/2 client for the tests: the `h2` library's client side over a real socket.

It records every event per stream, so a test can assert what the proxy sent
(heads, data, trailers, resets, GOAWAY) frame by frame, and it can also send raw
frames (`send_raw`) the library would refuse to make.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)

from .conftest import LOOPBACK


@dataclass
class Answer:
    """What one stream received."""

    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    interim: list[int] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None  # the error code of a RST_STREAM from the proxy

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    @property
    def over(self) -> bool:
        return self.ended or self.reset is not None


class H2Client:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, validate: bool = True
    ) -> None:
        self.reader = reader
        self.writer = writer
        config = H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=validate,  # False: send heads the proxy must refuse
            normalize_outbound_headers=validate,
        )
        self.conn = H2Connection(config)
        self.answers: dict[int, Answer] = {}
        self.goaway: ConnectionTerminated | None = None
        self.goaway_while_open: list[int] = []  # streams still unanswered when GOAWAY came
        self.closed = asyncio.Event()
        self.changed = asyncio.Event()
        self.read_window = True  # False: received data is not acknowledged (a slow reader)
        self.task: asyncio.Task | None = None

    @classmethod
    async def connect(
        cls, port: int, ctx: ssl.SSLContext | None = None, validate: bool = True
    ) -> H2Client:
        name = "shop.example" if ctx is not None else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(LOOPBACK, port, ssl=ctx, server_hostname=name), 10
        )
        client = cls(reader, writer, validate)
        client.conn.initiate_connection()
        client.flush()
        client.task = asyncio.get_running_loop().create_task(client.run())
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def run(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for event in self.conn.receive_data(data):
                    self.event(event)
                self.flush()
                self.changed.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            self.changed.set()

    def event(self, event: object) -> None:
        sid = getattr(event, "stream_id", None)
        answer = self.answers.setdefault(sid, Answer()) if sid else None
        if isinstance(event, ResponseReceived):
            answer.headers = list(event.headers)
            answer.status = int(dict(answer.headers)[":status"])
        elif isinstance(event, InformationalResponseReceived):
            answer.interim.append(int(dict(event.headers)[":status"]))
        elif isinstance(event, DataReceived):
            answer.body += event.data
            if self.read_window:
                self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
        elif isinstance(event, TrailersReceived):
            answer.trailers = list(event.headers)
        elif isinstance(event, StreamEnded):
            answer.ended = True
        elif isinstance(event, StreamReset):
            answer.reset = event.error_code
        elif isinstance(event, ConnectionTerminated):
            self.goaway = event
            self.goaway_while_open = [s for s, a in self.answers.items() if not a.over]

    def request(
        self,
        path: str = "/",
        method: str = "GET",
        body: bytes | None = None,
        headers: list[tuple[str, str]] = (),
        end: bool = True,
        authority: str = "shop.example",
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        head = [
            (":method", method),
            (":path", path),
            (":scheme", "https"),
            (":authority", authority),
        ]
        self.conn.send_headers(sid, [*head, *headers], end_stream=end and body is None)
        self.answers[sid] = Answer()
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        self.conn.send_data(sid, data, end_stream=end)
        self.flush()

    async def upload(self, sid: int, data: bytes, end: bool = True, timeout: float = 10.0) -> None:
        """Send `data` on `sid` as the proxy's windows allow (waiting for them to open)."""
        view = memoryview(data)
        while view:
            await self.until(lambda: self.conn.local_flow_control_window(sid) > 0, timeout)
            n = min(
                len(view),
                self.conn.local_flow_control_window(sid),
                self.conn.max_outbound_frame_size,
            )
            self.conn.send_data(sid, bytes(view[:n]))
            self.flush()
            view = view[n:]
        if end:
            self.conn.end_stream(sid)
            self.flush()

    async def until(self, probe, timeout: float = 10.0) -> None:
        async def wait() -> None:
            while not probe():
                self.changed.clear()
                if self.closed.is_set() and not probe():
                    raise AssertionError("the connection closed first")
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def answer(self, sid: int, timeout: float = 10.0) -> Answer:
        await self.until(lambda: self.answers[sid].over, timeout)
        return self.answers[sid]

    async def get(self, path: str = "/", **kw) -> Answer:
        return await self.answer(self.request(path, **kw))

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writer.close()
