"""gRPC canaries (PRODUCT.md §14) with real grpcio servers and clients over loopback:
HTTP/2 to the upstreams (h2c:// and `protocol: h2` over TLS), every kind of RPC
passed through with its metadata and trailers, `grpc-status` as the outcome the
guard judges (an UNAVAILABLE canary is rolled back, the codes in the evidence),
`turnout_grpc_responses_total`, and a gRPC call to an HTTP/1.1-only version
answered UNAVAILABLE instead of a broken stream."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import pytest

from .conftest import LOOPBACK, eventually, versions_config
from .support import Authority

pytestmark = pytest.mark.live

SERVICE = "demo.Echo"
VERSIONS = ("blue", "green")


class EchoServer:
    """A grpcio server with the four kinds of RPC; `failing` makes Unary abort with
    UNAVAILABLE. Raw bytes in and out: no generated code."""

    def __init__(self, name: str, credentials: grpc.ServerCredentials | None = None) -> None:
        self.name = name
        self.failing = False
        self.metadata: list[dict[str, str]] = []
        self.calls = 0
        self.lock = threading.Lock()
        handlers = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "Server": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "Client": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((handlers,))
        if credentials is None:
            self.port = self.server.add_insecure_port(f"{LOOPBACK}:0")
        else:
            self.port = self.server.add_secure_port(f"{LOOPBACK}:0", credentials)
        self.server.start()

    def seen(self, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls += 1
            self.metadata.append(dict(context.invocation_metadata()))

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.seen(context)
        if self.failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is down")
        context.set_trailing_metadata((("x-served-by", self.name),))
        return self.name.encode() + b":" + request

    def server_stream(self, request: bytes, context: grpc.ServicerContext):
        self.seen(context)
        for i in range(int(request)):
            yield b"%d" % i

    def client_stream(self, requests, context: grpc.ServicerContext) -> bytes:
        self.seen(context)
        return b"+".join(requests)

    def bidi(self, requests, context: grpc.ServicerContext):
        self.seen(context)
        for message in requests:
            yield message[::-1]

    @property
    def url(self) -> str:
        return f"h2c://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def echo():
    started: list[EchoServer] = []

    def make(name: str, credentials: grpc.ServerCredentials | None = None) -> EchoServer:
        server = EchoServer(name, credentials)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def grpc_config(blue: str, green: str, **extra) -> dict:
    routing = {"weight": 50, "sticky": {"key": "header:x-user-id"}}
    return versions_config(blue, green, http2={"cleartext": True}, routing=routing, **extra)


def call(port: int, method: str, request, user: str = "u-1", stream: str = "unary"):
    """One RPC through the proxy (in a thread: grpcio's client blocks)."""
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        path = f"/{SERVICE}/{method}"
        metadata = [("x-user-id", user)]
        if stream == "unary":
            answer, rpc = channel.unary_unary(path).with_call(
                request, metadata=metadata, timeout=10
            )
            return answer, dict(rpc.initial_metadata()), dict(rpc.trailing_metadata())
        if stream == "server":
            return list(channel.unary_stream(path)(request, metadata=metadata, timeout=10))
        if stream == "client":
            return channel.stream_unary(path)(iter(request), metadata=metadata, timeout=10)
        return list(channel.stream_stream(path)(iter(request), metadata=metadata, timeout=10))


async def test_every_kind_of_rpc_passes_through_routed_by_metadata(proxies, echo):
    blue, green = echo("blue"), echo("green")
    proxy = await proxies.start(grpc_config(blue.url, green.url))
    answers = {}
    for user in ("u-1", "u-2", "u-3", "u-4", "u-5", "u-6"):
        for _ in range(2):  # sticky: the same user, the same version
            answer, head, trailers = await asyncio.to_thread(call, proxy.port, "Unary", b"hi", user)
            served = head["x-turnout-version"]
            assert answer == served.encode() + b":hi" and trailers["x-served-by"] == served
            assert answers.setdefault(user, served) == served
    assert set(answers.values()) == {"blue", "green"}  # six users spread over both
    assert blue.metadata[0]["x-user-id"] in answers
    port = proxy.port
    assert await asyncio.to_thread(call, port, "Server", b"5", stream="server") == [
        b"0", b"1", b"2", b"3", b"4"
    ]  # fmt: skip
    many = [b"m%d" % i for i in range(50)]
    assert await asyncio.to_thread(call, port, "Client", many, stream="client") == b"+".join(many)
    replies = await asyncio.to_thread(call, port, "Bidi", [b"abc", b"xyz" * 40_000], stream="bidi")
    assert replies == [b"cba", b"zyx" * 40_000]  # 120 kB: past the first windows
    m = await proxy.metrics()
    total = sum(
        m.get("turnout_grpc_responses_total", version=v, grpc_status="0") for v in answers.values()
    )
    assert total >= 12 + 3
    assert blue.calls + green.calls == 15
    # One multiplexed connection per endpoint served all of it.
    status = await proxy.status()
    assert status["config"]["generation"] == 1


async def test_an_unavailable_canary_is_rolled_back_with_grpc_status_in_evidence(proxies, echo):
    blue, green = echo("blue"), echo("green")
    green.failing = True
    guard = {"window": "10s", "min_requests": 20, "max_error_rate": 0.02,
             "relative_to_stable": True, "on_breach": "rollback"}  # fmt: skip
    config = grpc_config(blue.url, green.url, guard=guard)
    config["versions"]["green"]["release"] = "2.0.0"
    proxy = await proxies.start(config)

    def traffic() -> dict[str, int]:
        codes: dict[str, int] = {}
        with grpc.insecure_channel(f"{LOOPBACK}:{proxy.port}") as channel:
            unary = channel.unary_unary(f"/{SERVICE}/Unary")
            for i in range(400):
                try:
                    unary(b"x", metadata=[("x-user-id", f"u-{i}")], timeout=10)
                    codes["OK"] = codes.get("OK", 0) + 1
                except grpc.RpcError as e:
                    codes[e.code().name] = codes.get(e.code().name, 0) + 1
        return codes

    async def latched():
        doc = await proxy.status()
        return doc if doc["rollback"]["active"] else None

    codes = await asyncio.to_thread(traffic)
    assert codes.get("UNAVAILABLE", 0) > 0  # the canary's answers reached the clients
    doc = await eventually(latched, timeout=15)
    latch = doc["rollback"]
    assert latch["reason"].startswith("guard: canary breached") and latch["actor"] == "guard"
    grpc_codes = latch["evidence"]["grpc_status"]
    assert grpc_codes["green"]["14"] > 0 and set(grpc_codes["blue"]) == {"0"}
    m = await proxy.metrics()
    assert m.get("turnout_grpc_responses_total", version="green", grpc_status="14") > 0
    # Rolled back: every call now goes to the stable version, and succeeds.
    after = await asyncio.to_thread(traffic)
    assert after == {"OK": 400}


async def test_a_grpc_call_to_an_http11_version_is_unavailable(proxies, echo, upstreams):
    blue = echo("blue")
    plain = await upstreams.app("green")
    config = grpc_config(blue.url, plain.url)
    config["routing"] = {"weight": 100}
    proxy = await proxies.start(config)
    with pytest.raises(grpc.RpcError) as raised:
        await asyncio.to_thread(call, proxy.port, "Unary", b"hi")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    # The cause, in words the client shows.
    assert raised.value.details() == (
        "turnout: gRPC needs an HTTP/2 upstream: version green speaks HTTP/1.1"
    )
    assert plain.requests == []  # never forwarded
    m = await proxy.metrics()
    assert m.get("turnout_grpc_responses_total", version="green", grpc_status="14") == 1
    assert m.get("turnout_upstream_errors_total", version="green", kind="protocol") == 1


async def test_protocol_h2_over_tls_to_the_upstream(proxies, echo, tmp_path):
    authority = Authority(tmp_path)
    cert, key = authority.issue("up", "up.internal")
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    blue, green = echo("blue", credentials), echo("green")
    tls = {"ca": str(authority.ca_file()), "server_name": "up.internal"}
    config = grpc_config(f"https://{LOOPBACK}:{blue.port}", green.url)
    config["versions"]["blue"].update(protocol="h2", tls=tls)
    config["routing"] = {"weight": 0}
    proxy = await proxies.start(config)
    answer, head, _ = await asyncio.to_thread(call, proxy.port, "Unary", b"tls")
    assert answer == b"blue:tls" and head["x-turnout-version"] == "blue"
