"""The reloader in-process: a Reloader over a Runtime and a config file, no proxy
process. A write landing right after a rejected load, and a failure of any kind while
reloading (the reloads of a running proxy are in test_reload.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from proxy import reload as reload_module
from proxy.config import load
from proxy.reload import Reloader
from proxy.runtime import Runtime

from .test_reload import config

pytestmark = pytest.mark.unit


def _runtime(tmp_path: Path, text: str) -> tuple[Path, Reloader]:
    path = tmp_path / "turnout.yaml"
    path.write_text(text)
    return path, Reloader(Runtime(load(str(path))))


def _valid(weight: int) -> str:
    return yaml.safe_dump(config("http://127.0.0.1:9", "http://127.0.0.1:10", weight))


async def test_a_write_landing_right_after_a_rejected_load_is_applied(tmp_path: Path, monkeypatch):
    """The race: a rejected load, then a valid write before the reloader notes what it saw."""
    path, reloader = _runtime(tmp_path, _valid(0))
    path.write_text(_valid(0).replace("weight: 0", "weight: 150"))
    real_load = reload_module.load

    def load_then_a_write_lands(p: str):
        try:
            return real_load(p)
        finally:
            path.write_text(_valid(50))  # after the bad bytes were parsed

    monkeypatch.setattr(reload_module, "load", load_then_a_write_lands)
    await reloader.check("test")
    assert "routing.weight" in (reloader.runtime.last_error or "")
    monkeypatch.setattr(reload_module, "load", real_load)
    assert await asyncio.to_thread(reloader.changed)  # the new bytes were never parsed
    await reloader.check("test")
    assert reloader.runtime.snapshot.generation == 2
    assert reloader.runtime.config.routing.weight == 50
    await reloader.check("test")  # and nothing changed since: no new generation
    assert reloader.runtime.snapshot.generation == 2


async def test_a_failure_of_any_kind_while_reloading_keeps_the_old_config(
    tmp_path: Path, monkeypatch
):
    path, reloader = _runtime(tmp_path, _valid(0))
    path.write_text(_valid(20))

    def broken(p: str):
        raise MemoryError("simulated")

    monkeypatch.setattr(reload_module, "load", broken)
    await reloader.check("test")  # never raises
    rt = reloader.runtime
    assert rt.snapshot.generation == 1 and "MemoryError" in (rt.last_error or "")
    assert rt.recorder.reloads["failure"] == 1
    monkeypatch.setattr(reload_module, "load", load)
    ok, error = await reloader.reload_now("test")
    assert ok and error is None and rt.config.routing.weight == 20 and rt.last_error is None


async def test_a_config_its_server_cannot_prepare_is_rejected_and_the_old_kept(
    tmp_path: Path,
):
    """What a config needs besides the snapshot (the listener's TLS contexts) is
    built before it is put in force: a failure there rejects the reload whole."""
    path = tmp_path / "turnout.yaml"
    path.write_text(_valid(0))
    calls: list[int] = []

    def prepare(cfg) -> None:
        calls.append(cfg.routing.weight)
        if cfg.routing.weight == 20:
            raise ValueError("OpenSSL refused the context")

    swapped: list[int] = []
    reloader = Reloader(
        Runtime(load(str(path))), on_swap=lambda old, new: swapped.append(new.routing.weight),
        prepare=prepare,
    )  # fmt: skip
    path.write_text(_valid(20))
    ok, error = await reloader.reload_now("test")
    rt = reloader.runtime
    assert not ok and error == "cannot apply the config: OpenSSL refused the context"
    assert rt.snapshot.generation == 1 and rt.config.routing.weight == 0
    assert rt.last_error == error and swapped == []
    path.write_text(_valid(30))
    ok, error = await reloader.reload_now("test")
    assert ok and rt.config.routing.weight == 30 and swapped == [30] and calls == [20, 30]
