"""proxy.state: the persisted latch and rollout progress; atomic, and loud when corrupt."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from proxy import rollout, state
from proxy.config import RolloutConfig, Step
from proxy.state import Latch, State, StateError

pytestmark = pytest.mark.unit

LATCHED = State(
    latch=Latch(
        active=True,
        reason="error rate 9.1% > 2% (p=1e-9)",
        at=1700000000.5,
        release="2.4.0",
        evidence={"canary": {"requests": 230, "errors": 21}, "tests": {"p_value": 1e-9}},
        actor="guard",
    ),
    rollout=rollout.to_dict(rollout.start(RolloutConfig((Step(1), Step(100))), 5.0, 7)),
    release="2.4.0",
)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "turnout-state.json")
    state.save(path, LATCHED)
    assert state.load(path) == LATCHED
    assert files(tmp_path) == ["turnout-state.json"]
    doc = json.loads(Path(path).read_text())
    assert doc["version"] == 1
    assert doc["latch"]["active"] is True
    assert state.from_json(state.to_json(LATCHED)) == LATCHED


def test_the_empty_state_round_trips(tmp_path: Path) -> None:
    path = str(tmp_path / "s.json")
    state.save(path, State())
    assert state.load(path) == State()
    assert State().latch == Latch() and State().latch.active is False


def test_save_replaces_the_previous_state(tmp_path: Path) -> None:
    path = str(tmp_path / "s.json")
    state.save(path, LATCHED)
    state.save(path, State(release="2.5.0"))
    assert state.load(path) == State(release="2.5.0")
    assert files(tmp_path) == ["s.json"]


def test_a_missing_file_is_the_empty_state(tmp_path: Path) -> None:
    assert state.load(str(tmp_path / "nope.json")) == State()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "not valid JSON"),
        ("", "empty"),
        ("[1, 2]", "must be a JSON object"),
        ('{"version": 2}', "version"),
        ('{"latch": {"active": "yes"}}', "latch.active"),
        ('{"latch": {"at": "noon"}}', "latch.at"),
        ('{"latch": []}', "latch"),
        ('{"latch": {"active": true, "colour": 1}}', "colour"),
        ('{"release": 7}', "release"),
        ('{"rollout": {"phase": "running"}}', "rollout.phase"),
        ('{"surprise": 1}', "surprise"),
        (b"\xff\xfe{}", "not valid JSON"),
    ],
)
def test_corrupt_or_wrongly_shaped_files_raise(tmp_path: Path, text: str | bytes, words: str):
    path = tmp_path / "s.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(StateError) as info:
        state.load(str(path))
    assert str(path) in str(info.value)
    assert words in str(info.value)


def test_a_truncated_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    state.save(str(path), LATCHED)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(StateError, match="corrupt or truncated"):
        state.load(str(path))


def test_an_unreadable_path_raises(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="cannot read state file"):
        state.load(str(tmp_path))  # a folder


def test_a_failed_replace_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "s.json")
    state.save(path, LATCHED)
    before = Path(path).read_bytes()

    def broken(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="No space left"):
        state.save(path, State())
    assert Path(path).read_bytes() == before
    assert files(tmp_path) == ["s.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "s.json")
    state.save(path, LATCHED)
    before = Path(path).read_bytes()

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output"):
        state.save(path, State())
    assert Path(path).read_bytes() == before
    assert files(tmp_path) == ["s.json"]


def test_unserializable_evidence_fails_before_touching_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "s.json")
    state.save(path, LATCHED)
    bad = State(latch=Latch(active=True, evidence={"rate": float("nan")}))
    with pytest.raises(ValueError):
        state.save(path, bad)
    assert state.load(path) == LATCHED
    assert files(tmp_path) == ["s.json"]


def test_concurrent_saves_in_one_process_never_mix(tmp_path: Path) -> None:
    path = str(tmp_path / "s.json")
    states = [
        State(release=f"r{i}", latch=Latch(active=bool(i % 2), reason="x" * i)) for i in range(8)
    ]
    errors: list[BaseException] = []

    def writer(s: State) -> None:
        try:
            for _ in range(25):
                state.save(path, s)
                assert state.load(path) in states
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert state.load(path) in states
    assert files(tmp_path) == ["s.json"]
