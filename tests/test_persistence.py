"""A latch that cannot be written down, over real sockets (one process; the
fleet's side is in test_workers.py): it stays in force, the action says it is
not saved (503), /status and /metrics show it, /readyz is not ready, and the
write is retried until the folder takes it, so a kill -9 then keeps it.

The state folder is made unwritable by putting a plain file in its place:
every write then fails as on a read-only volume, for root too (root ignores
permission bits)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import yaml

from .conftest import Proxy, ProxyFactory, eventually, versions_config
from .live import admin, status, versions_seen

pytestmark = pytest.mark.live


class StateFolder:
    """The folder of a proxy's state file, which a test can make unwritable and mend."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.away = path.with_name(path.name + ".away")
        path.mkdir()

    @property
    def state_file(self) -> Path:
        return self.path / "turnout-state.json"

    def make_unwritable(self) -> None:
        self.path.rename(self.away)
        self.path.write_text("a file where the state folder was: writes fail\n")

    def mend(self) -> None:
        self.path.unlink()
        self.away.rename(self.path)


def state_config(blue, green, weight: int = 100) -> dict:
    return versions_config(
        blue.url, green.url, state_file="state/turnout-state.json",
        routing={"weight": weight, "sticky": {"key": "header:X-User-Id"}},
    )  # fmt: skip


async def ready(proxy: Proxy) -> tuple[int, dict]:
    return await admin(proxy, "GET", "/readyz")


def log_count(proxy: Proxy, words: str) -> int:
    return proxy.log_path.read_text(errors="replace").count(words)


async def test_an_unsaved_rollback_answers_503_holds_and_is_saved_once_it_can_be(
    proxies: ProxyFactory, blue, green, session, tmp_path
):
    folder = StateFolder(tmp_path / "state")
    proxy = await proxies.start(state_config(blue, green))
    assert await versions_seen(session, proxy, 20) == {"green": 20}
    folder.make_unwritable()

    code, doc = await admin(proxy, "POST", "/rollback", body={"reason": "disk test"})
    assert code == 503, doc
    assert doc["ok"] is False and doc["latched"] is True and doc["persisted"] is False
    assert "cannot write state file" in doc["error"]
    assert doc["status"]["rollback"]["active"] is True
    assert await versions_seen(session, proxy, 20) == {"blue": 20}  # in force all the same

    st = (await status(proxy))["state"]
    assert st["persisted"] is False and "cannot write state file" in st["error"]
    code, body = await ready(proxy)
    assert code == 503 and "not saved" in body["reason"]

    async def retried():  # the write is tried again, and logged only once
        m = await proxy.metrics()
        return m.get("turnout_state_write_failures_total") >= 3 or None

    await eventually(retried, timeout=10)
    assert log_count(proxy, "cannot write state file") == 1

    folder.mend()

    async def saved():
        code, _ = await ready(proxy)
        return code == 200 and (await status(proxy))["state"]["persisted"] or None

    await eventually(saved, timeout=5)
    on_disk = yaml.safe_load(folder.state_file.read_text())
    assert on_disk["latch"]["active"] is True and on_disk["latch"]["reason"] == "disk test"

    # Killed outright and started again: the latch is still there.
    os.kill(proxy.pid, signal.SIGKILL)
    assert await proxy.wait(5) == -signal.SIGKILL
    await proxy.stop()
    await proxy.start()
    doc = await status(proxy)
    assert doc["rollback"]["active"] is True and doc["rollback"]["reason"] == "disk test"
    assert await versions_seen(session, proxy, 20) == {"blue": 20}


async def test_a_saved_rollback_answers_ok(proxies: ProxyFactory, blue, green, tmp_path):
    StateFolder(tmp_path / "state")
    proxy = await proxies.start(state_config(blue, green))
    code, doc = await admin(proxy, "POST", "/rollback", body={"reason": "fine"})
    assert code == 200, doc
    assert doc["ok"] is True and doc["latched"] is True and doc["persisted"] is True
    assert doc["error"] is None and doc["in_force"] == {"workers": 1, "unconfirmed": {},
                                                        "starting": []}  # fmt: skip
    assert (await status(proxy))["state"]["persisted"] is True
    code, _ = await ready(proxy)
    assert code == 200


async def test_an_unsaved_resume_leaves_the_proxy_ready(
    proxies: ProxyFactory, blue, green, tmp_path
):
    """Only a set latch that a restart would forget takes the proxy out of rotation."""
    folder = StateFolder(tmp_path / "state")
    proxy = await proxies.start(state_config(blue, green))
    code, _ = await admin(proxy, "POST", "/rollback")
    assert code == 200
    folder.make_unwritable()
    code, doc = await admin(proxy, "POST", "/resume")
    assert code == 200, doc
    assert (await status(proxy))["state"]["persisted"] is False
    code, _ = await ready(proxy)
    assert code == 200


async def test_every_version_has_its_series_from_the_start(proxy: Proxy):
    """PRODUCT.md §13: at 0 before any request, not missing."""
    m = await proxy.metrics()
    names = {(name, labels.get("version")) for name, labels, _ in m.samples}
    for version in ("blue", "green"):
        assert ("turnout_in_flight_requests", version) in names
        assert ("turnout_request_duration_seconds_count", version) in names
        assert ("turnout_upstream_errors_total", version) in names
    assert m.get("turnout_in_flight_requests", version="green") == 0
    assert ("turnout_state_write_failures_total", None) in names
