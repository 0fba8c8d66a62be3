"""The access log (PRODUCT.md section 15): one JSON line per exchange, written off
the event loop; rotation by rename + SIGHUP; a full or stuck file never stalls
a request. Unit tests of the formatting first, then the proxy over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import threading
from pathlib import Path

import aiohttp
import pytest

from proxy.accesslog import METHOD_MAX, REFUSED, TARGET_MAX, AccessLog, Formatter, quoted_bytes
from proxy.config import Endpoint
from proxy.http.upstream import Pool
from proxy.routing import Decision

from .conftest import LOOPBACK, Proxy, RawClient, eventually, request, versions_config
from .test_workers import WORKERS_ENV, fresh_connections, start_fleet

FIELDS = {
    "time", "client", "method", "path", "status", "version", "reason", "bytes_in",
    "bytes_out", "duration_ms", "upstream", "shadow", "error",
}  # fmt: skip


def parse_lines(data: bytes) -> list[dict]:
    """Every line must be one JSON object with exactly the fields of the contract."""
    assert data == b"" or data.endswith(b"\n"), data[-200:]
    docs = []
    for line in data.splitlines():
        assert line.isascii(), line
        doc = json.loads(line)
        assert set(doc) == FIELDS, doc
        docs.append(doc)
    return docs


def read_log(path: Path) -> list[dict]:
    return parse_lines(path.read_bytes()) if path.exists() else []


# ------------------------------------------------------------------------------- unit


@pytest.mark.unit
@pytest.mark.parametrize(
    ("raw", "written"),
    [
        (b"/plain/path?q=1&b=%20", '"/plain/path?q=1&b=%20"'),
        (b'/a"b', r'"/a\"b"'),
        (b"/a\\b", r'"/a\\b"'),
        (b"/caf\xc3\xa9", '"/caf%C3%A9"'),
        (b"/x\x00y\x7f\r\n", '"/x%00y%7F%0D%0A"'),
        (b'/\xff"\\', r'"/%FF\"\\"'),
        (b"", '""'),
        (None, "null"),
    ],
)
def test_client_strings_are_written_as_one_safe_json_string(raw, written):
    out = quoted_bytes(raw)
    assert out.decode("ascii") == written
    if raw:
        back = json.loads(out)
        assert "\n" not in back and "\r" not in back


@pytest.mark.unit
def test_a_record_becomes_one_line_with_every_field():
    log = AccessLog()
    pool = Pool(Endpoint("http://127.0.0.1:9001", "127.0.0.1", 9001))
    log.record(100.0, 100.0125, "127.0.0.1", b"POST", b"/orders?x=1", 201,
               Decision("blue", "weight"), 12, 34, pool, None, False)  # fmt: skip
    log.record(100.5, 101.0, "::1", b"GET", b'/"}{', 0, ("green", "mirror"), 0, 0, pool,
               "timeout", True)  # fmt: skip
    log.record(102.0, 102.0, "10.0.0.1", None, None, 400, REFUSED, 0, 0, None,
               "refused: bad request", False)  # fmt: skip
    wall = 1_780_000_000.0  # 2026-05-28T20:26:40Z
    batch = log.take()
    docs = parse_lines(Formatter().lines(batch, 0, len(batch), wall - 100.0))
    assert log.take() == []
    assert docs[0] == {
        "time": "2026-05-28T20:26:40.000Z", "client": "127.0.0.1", "method": "POST",
        "path": "/orders?x=1", "status": 201, "version": "blue", "reason": "weight",
        "bytes_in": 12, "bytes_out": 34, "duration_ms": 12.5, "upstream": "127.0.0.1:9001",
        "shadow": False, "error": None,
    }  # fmt: skip
    assert docs[1]["path"] == '/"}{' and docs[1]["shadow"] is True
    assert docs[1]["status"] is None and docs[1]["error"] == "timeout"
    assert docs[1]["time"] == "2026-05-28T20:26:40.500Z"
    assert docs[2]["method"] is None and docs[2]["version"] is None
    assert docs[2]["status"] == 400 and docs[2]["upstream"] is None


@pytest.mark.unit
@pytest.mark.parametrize("fill", [b"a", b'"', b"\\", b"\xff"])
def test_a_long_target_is_cut_and_a_line_stays_shorter_than_pipe_buf(fill):
    log = AccessLog()
    long = b"/" + fill * (TARGET_MAX * 4)
    for _ in range(2):
        log.record(0.0, 0.0, "c" * 45, b"M" * 1000, long, 200, ("blue", "weight"), 0, 0,
                   None, "refused: " + "x" * 200, False)  # fmt: skip
    assert len(log.pending[0][4]) == TARGET_MAX + 1  # a record keeps no more than that
    f = Formatter()
    batch = log.take()
    data = f.lines(batch, 0, len(batch), 0.0)
    docs = parse_lines(data)
    assert all(len(line) < select.PIPE_BUF for line in data.splitlines())
    path = docs[0]["path"]
    assert path.endswith("...") and docs[1]["path"] == path
    assert path.startswith("/" + {b"a": "a", b'"': '"', b"\\": "\\", b"\xff": "%FF"}[fill] * 8)
    assert docs[0]["method"] == "M" * METHOD_MAX
    assert list(f.targets) == [None, b"M" * METHOD_MAX]  # long targets are not remembered


@pytest.mark.unit
def test_routes_are_encoded_once_per_version_and_reason():
    """`anonymous: cookie` makes a decision per request: each is a new object."""
    log = AccessLog()
    for i in range(3):
        log.record(0.0, 0.0, "c", b"GET", b"/", 200, Decision("blue", "random", 7, f"id{i}"),
                   0, 0, None, None, False)  # fmt: skip
    f = Formatter()
    batch = log.take()
    docs = parse_lines(f.lines(batch, 0, len(batch), 0.0))
    assert {(d["version"], d["reason"]) for d in docs} == {("blue", "random")}
    assert list(f.route_names) == [("blue", "random")]


@pytest.mark.unit
def test_records_past_the_limit_are_dropped_and_counted():
    log = AccessLog(limit=3)
    for i in range(5):
        log.record(0.0, 0.0, "c", b"GET", b"/%d" % i, 200, ("blue", "weight"), 0, 0, None,
                   None, False)  # fmt: skip
    assert [r[4] for r in log.take()] == [b"/0", b"/1", b"/2"]
    assert log.dropped == 2 and log.lost() == 2


# ------------------------------------------------------------------------------- live


def logged_config(blue, green, path: Path | str, **extra) -> dict:
    cfg = versions_config(
        blue.url, green.url,
        routing={"weight": 0, "sticky": {"key": "header:X-User-Id"},
                 "rules": [{"name": "beta", "match": {"header": {"X-Beta": "1"}},
                            "to": "canary"}]},
        access_log={"path": str(path)}, **extra,
    )  # fmt: skip
    return cfg


async def get(session: aiohttp.ClientSession, url: str, **kw) -> int:
    async with session.request(kw.pop("method", "GET"), url, **kw) as r:
        await r.read()
        return r.status


async def logged(path: Path, n: int, timeout: float = 5.0) -> list[dict]:
    """The log's lines once there are at least `n` (flushed within a second)."""

    def enough():
        docs = read_log(path)
        return docs if len(docs) >= n else None

    return await eventually(enough, timeout=timeout)


async def dropped(proxy: Proxy) -> float:
    return (await proxy.metrics()).get("turnout_access_log_dropped_total")


@pytest.mark.live
async def test_each_exchange_is_one_line_saying_who_served_it(proxies, blue, green, tmp_path):
    path = tmp_path / "access.log"
    proxy = await proxies.start(logged_config(blue, green, path))
    async with aiohttp.ClientSession() as s:
        assert await get(s, proxy.url + "/hello?x=1") == 200
        assert await get(s, proxy.url + "/beta", headers={"X-Beta": "1"}) == 200
        assert await get(s, proxy.url + "/upload", method="POST", data=b"z" * 1000) == 200
        assert await get(s, proxy.url + "/status/204") == 204
    docs = await logged(path, 4)
    assert len(docs) == 4
    by_path = {d["path"]: d for d in docs}
    first = by_path["/hello?x=1"]
    assert first["method"] == "GET" and first["status"] == 200 and first["client"] == LOOPBACK
    assert first["version"] == "blue" and first["reason"] == "random"
    assert first["upstream"] == f"{LOOPBACK}:{blue.port}" and first["shadow"] is False
    assert first["bytes_in"] == 0 and first["bytes_out"] > 0 and first["error"] is None
    assert first["duration_ms"] >= 0 and first["time"].endswith("Z")
    beta = by_path["/beta"]
    assert beta["version"] == "green" and beta["reason"] == "rule:beta"
    assert beta["upstream"] == f"{LOOPBACK}:{green.port}"
    upload = by_path["/upload"]
    assert upload["method"] == "POST" and upload["bytes_in"] == 1000
    assert upload["bytes_out"] == len(b'{"received": 1000}')
    assert by_path["/status/204"]["status"] == 204 and by_path["/status/204"]["bytes_out"] == 0
    assert await dropped(proxy) == 0
    assert (await proxy.status())["access_log"] == {"path": str(path), "lines_dropped": 0}
    # A target built to break a line or forge a field stays inside its own string.
    client = await RawClient.connect(proxy.port)
    await client.send(b'GET /q?a="},"status":999,"x":"\\ HTTP/1.1\r\nHost: a\r\n\r\n')
    assert (await client.response()).status == 200
    await client.close()
    forged = (await logged(path, 5))[4]
    assert forged["path"] == '/q?a="},"status":999,"x":"\\' and forged["status"] == 200
    assert blue.paths()[-1] == forged["path"]  # as the upstream received it


@pytest.mark.live
async def test_failures_and_refusals_are_logged_with_their_cause(
    proxies, upstreams, blue, tmp_path
):
    path = tmp_path / "access.log"
    dead = upstreams.dead_url()
    cfg = versions_config(
        blue.url, dead, routing={"weight": 0, "rules": [
            {"name": "beta", "match": {"header": {"X-Beta": "1"}}, "to": "canary"}]},
        access_log={"path": str(path)},
    )  # fmt: skip
    proxy = await proxies.start(cfg)
    async with aiohttp.ClientSession() as s:
        assert await get(s, proxy.url + "/x", headers={"X-Beta": "1"}) == 502
    client = await RawClient.connect(proxy.port)
    smuggle = (b"POST /smuggle HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")  # fmt: skip
    await client.send(smuggle)
    assert (await client.response()).status == 400
    await client.close()
    docs = await logged(path, 2)
    failed = next(d for d in docs if d["path"] == "/x")
    assert failed["status"] == 502 and failed["version"] == "green"
    assert failed["error"] == "connect" and failed["upstream"] == dead.removeprefix("http://")
    assert failed["bytes_out"] > 0  # the proxy's own JSON answer
    refused = next(d for d in docs if d["status"] == 400)
    assert refused["error"].startswith("refused: ") and refused["upstream"] is None
    assert "/smuggle" not in blue.paths()


@pytest.mark.live
async def test_shadow_copies_are_marked(proxies, blue, green, tmp_path):
    path = tmp_path / "access.log"
    cfg = logged_config(blue, green, path, mirror={"percent": 100})
    proxy = await proxies.start(cfg)
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            assert await get(s, proxy.url + f"/m{i}") == 200
    docs = await logged(path, 10)
    primaries = sorted(d["path"] for d in docs if not d["shadow"])
    copies = [d for d in docs if d["shadow"]]
    assert primaries == [f"/m{i}" for i in range(5)]
    assert sorted(d["path"] for d in copies) == primaries
    assert {d["version"] for d in copies} == {"green"} and {d["reason"] for d in copies} == {
        "mirror"
    }
    assert all(d["status"] == 200 and d["upstream"] == f"{LOOPBACK}:{green.port}" for d in copies)


class Counter:
    """Requests answered by a load loop."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0


async def steady_load(
    proxy: Proxy, counter: Counter, stop: asyncio.Event, limit: int = 200_000, depth: int = 50
) -> None:
    """Pipelined GETs, `depth` at a time, on 4 connections until `stop` (bounded by
    `limit` requests in all): each answer read is counted."""

    async def one_client(i: int) -> None:
        client = await RawClient.connect(proxy.port)
        burst = request("GET", f"/load/{i}") * depth
        try:
            while not stop.is_set() and counter.ok + counter.failed < limit:
                await client.send(burst)
                for _ in range(depth):
                    if (await client.response()).status == 200:
                        counter.ok += 1
                    else:
                        counter.failed += 1
        finally:
            await client.close()

    await asyncio.gather(*(one_client(i) for i in range(4)))


@pytest.mark.live
async def test_rotation_by_rename_and_sighup_loses_no_line(proxies, blue, green, tmp_path):
    path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    proxy = await proxies.start(logged_config(blue, green, path))
    counter, stop = Counter(), asyncio.Event()
    load = asyncio.create_task(steady_load(proxy, counter, stop))
    await eventually(lambda: path.exists() and path.stat().st_size > 0 or None, timeout=5)
    os.rename(path, rotated)  # logrotate's rename...
    at_rename = counter.ok
    await asyncio.sleep(0.3)  # requests keep coming while the old file is still written
    proxy.signal(signal.SIGHUP)  # ...and its postrotate
    await eventually(lambda: path.exists() and path.stat().st_size > 0 or None, timeout=5)
    await eventually(lambda: counter.ok > at_rename + 200 or None, timeout=10)
    stop.set()
    await load
    assert await proxy.stop() == 0  # the drain writes what is left
    old, new = read_log(rotated), read_log(path)
    print(f"{counter.ok} answered; {len(old)} lines in the rotated file, {len(new)} in the new")
    assert counter.failed == 0
    assert len(old) + len(new) == counter.ok
    assert old and new


@pytest.mark.live
async def test_a_full_disk_drops_and_counts_lines_and_requests_go_on(proxies, blue, green):
    proxy = await proxies.start(logged_config(blue, green, "/dev/full"))
    async with aiohttp.ClientSession() as s:
        for i in range(50):
            assert await get(s, proxy.url + f"/f{i}") == 200
    await eventually(lambda: dropped(proxy), timeout=5)

    async def all_dropped():
        return await dropped(proxy) == 50 or None

    await eventually(all_dropped, timeout=5)
    assert (await proxy.status())["access_log"]["lines_dropped"] == 50
    assert proxy.log().count("access log: writing to /dev/full failed") == 1


@pytest.mark.live
async def test_a_stuck_log_never_stalls_a_request(proxies, blue, green, tmp_path):
    """A FIFO that is opened but not read: the writer blocks once the pipe is full;
    requests go on, batches past the writer's queue are dropped and counted, and
    every line is either read or counted once the reader wakes."""
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that reads nothing yet
    try:
        proxy = await proxies.start(logged_config(blue, green, fifo))
        counter, stop = Counter(), asyncio.Event()
        load = asyncio.create_task(steady_load(proxy, counter, stop))

        async def some_dropped():
            return await dropped(proxy) > 0 or None

        await eventually(some_dropped, timeout=30)
        before = counter.ok
        await eventually(lambda: counter.ok > before + 100 or None, timeout=10)
        stop.set()
        await load
        assert counter.failed == 0
        chunks: list[bytes] = []
        done = threading.Event()

        def drain_fifo() -> None:
            os.set_blocking(reader_fd, True)
            while True:
                chunk = os.read(reader_fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
            done.set()

        thread = threading.Thread(target=drain_fifo, daemon=True)
        thread.start()
        assert await proxy.stop() == 0
        await asyncio.to_thread(done.wait, 10)
        docs = parse_lines(b"".join(chunks))
        said = re.search(r"access log closed: (\d+) lines dropped in all", proxy.log())
        assert said is not None, proxy.log()
        lost = int(said[1])
        print(f"{counter.ok} answered; {len(docs)} lines read, {lost} dropped")
        assert len(docs) + lost == counter.ok
        assert lost > 0 and docs
    finally:
        with contextlib.suppress(OSError):
            os.close(reader_fd)


@pytest.mark.live
async def test_a_deleted_file_is_made_again(proxies, blue, green, tmp_path):
    path = tmp_path / "access.log"
    proxy = await proxies.start(logged_config(blue, green, path))
    async with aiohttp.ClientSession() as s:
        assert await get(s, proxy.url + "/before") == 200
        await logged(path, 1)
        path.unlink()

        async def made_again():
            assert await get(s, proxy.url + "/after") == 200
            return read_log(path) or None

        docs = await eventually(made_again, timeout=10, interval=0.2)
    assert {d["path"] for d in docs} == {"/after"}
    assert "was deleted: making it again" in proxy.log()


@pytest.mark.live
async def test_the_drain_writes_the_exchanges_it_cuts_off(proxies, blue, green, tmp_path):
    path = tmp_path / "access.log"
    cfg = logged_config(blue, green, path)
    cfg["limits"] = {"drain_timeout": "0.5s"}
    proxy = await proxies.start(cfg)
    client = await RawClient.connect(proxy.port)
    await client.send(request("GET", "/slow?delay=5"))
    await eventually(lambda: "/slow?delay=5" in blue.paths() or None, timeout=5)
    assert await proxy.stop() == 0
    await client.close()
    (doc,) = read_log(path)
    assert doc["path"] == "/slow?delay=5" and doc["status"] == 499


@pytest.mark.live
async def test_a_dash_writes_to_standard_output(proxies, blue, green):
    proxy = await proxies.start(logged_config(blue, green, "-"))
    async with aiohttp.ClientSession() as s:
        assert await get(s, proxy.url + "/to-stdout") == 200

    def printed():
        lines = [ln for ln in proxy.log().splitlines() if ln.startswith('{"time"')]
        return lines or None

    (line,) = await eventually(printed, timeout=5)
    assert json.loads(line)["path"] == "/to-stdout"


@pytest.mark.live
async def test_a_reload_turns_the_log_on_moves_it_and_a_bad_path_is_refused(
    proxies, blue, green, tmp_path
):
    proxy = proxies.new()
    plain = versions_config(blue.url, green.url)
    proxy.write_config(plain)
    await proxy.start()
    first, second = tmp_path / "one.log", tmp_path / "two.log"
    async with aiohttp.ClientSession() as s:
        assert await get(s, proxy.url + "/unlogged") == 200
        generation = await proxy.generation()
        proxy.write_config(dict(plain, access_log={"path": str(first)}))
        await eventually(lambda: proxy_generation_above(proxy, generation), timeout=10)
        assert await get(s, proxy.url + "/one") == 200
        assert [d["path"] for d in await logged(first, 1)] == ["/one"]
        generation = await proxy.generation()
        proxy.write_config(dict(plain, access_log={"path": str(tmp_path / "no" / "x.log")}))
        await eventually(lambda: reload_failed(proxy), timeout=10)
        assert await proxy.generation() == generation  # the old config, the old log
        assert await get(s, proxy.url + "/still-one") == 200
        await logged(first, 2)
        proxy.write_config(dict(plain, access_log={"path": str(second)}))
        await eventually(lambda: proxy_generation_above(proxy, generation), timeout=10)
        assert await get(s, proxy.url + "/two") == 200
        assert [d["path"] for d in await logged(second, 1)] == ["/two"]
        generation = await proxy.generation()
        proxy.write_config(plain)  # off again: what was recorded is written first
        await eventually(lambda: proxy_generation_above(proxy, generation), timeout=10)
        await eventually(lambda: "access log off" in proxy.log() or None, timeout=5)
        assert await get(s, proxy.url + "/unlogged-again") == 200
    assert [d["path"] for d in read_log(first)] == ["/one", "/still-one"]
    assert [d["path"] for d in read_log(second)] == ["/two"]
    assert "/unlogged" not in first.read_text()


async def proxy_generation_above(proxy: Proxy, generation: int) -> bool | None:
    return await proxy.generation() > generation or None


async def reload_failed(proxy: Proxy) -> bool | None:
    doc = await proxy.status()
    return bool(doc["config"].get("last_error")) or None


@pytest.mark.live
async def test_workers_share_one_file_and_every_line_is_whole(proxies, blue, green, tmp_path):
    path = tmp_path / "access.log"
    proxy = await start_fleet(proxies, logged_config(blue, green, path))
    assert WORKERS_ENV["TURNOUT_WORKERS"] == "2"
    n = 120
    seen = await fresh_connections(proxy, n)
    assert len(seen) == n
    assert await proxy.stop() == 0
    docs = read_log(path)
    assert len(docs) == n
    assert sorted(d["path"] for d in docs) == ["/"] * n
