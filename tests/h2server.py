"""An HTTP/2 upstream for the tests: the `h2` library's server side over a real socket,
answering each request as a test's `plan` says, frame by frame (empty DATA frames,
trailers, resets, GOAWAY), and recording what it received."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived, StreamEnded

from .conftest import LOOPBACK


@dataclass
class Received:
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)
    connection: int = 0  # which connection (1, 2, ...) carried it


Plan = Callable[["H2Upstream", "Session", int, Received], Awaitable[None]]


class Session(asyncio.Protocol):
    def __init__(self, owner: H2Upstream) -> None:
        self.owner = owner
        # Outbound checks off: a plan may answer as a hostile upstream would.
        config = H2Configuration(
            client_side=False,
            header_encoding="utf-8",
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = H2Connection(config)
        self.transport: asyncio.Transport | None = None
        self.received: dict[int, Received] = {}
        owner.connections += 1
        self.number = owner.connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, RequestReceived):
                got = Received(dict(event.headers), connection=self.number)
                self.received[event.stream_id] = got
                self.owner.requests.append(got)
            elif isinstance(event, DataReceived):
                self.received[event.stream_id].body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                got = self.received[event.stream_id]
                task = asyncio.ensure_future(
                    self.owner.plan(self.owner, self, event.stream_id, got)
                )
                self.owner.tasks.add(task)
                task.add_done_callback(self.owner.tasks.discard)
        self.flush()


class H2Upstream:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.requests: list[Received] = []
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None
        self.tasks: set[asyncio.Future] = set()
        self.port = 0

    async def start(self) -> H2Upstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Session(self), LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"h2c://{LOOPBACK}:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
