"""The fleet's ledger in-process (proxy.workers.Ledger): two slots a name written in
turn, each copy numbered, read back by a successor. The fleet is in test_workers.py."""

from __future__ import annotations

import pytest

from proxy.workers import Ledger

pytestmark = pytest.mark.unit


def test_the_ledger_keeps_the_newest_whole_copy(tmp_path):
    first = Ledger(str(tmp_path))
    assert first.read("counts") is None
    for i in range(3):  # copies 1, 2, 3 in slots 1, 0, 1
        assert first.write("counts", {"i": i})
    assert first.read("counts") == {"i": 2}
    successor = Ledger(str(tmp_path))  # a new leader numbers on: copy 4, in slot 0
    assert successor.write("counts", {"i": 3}) and successor.read("counts") == {"i": 3}
    cut = tmp_path / "counts.0"
    cut.write_bytes(cut.read_bytes()[:9])  # cut short by a kill in the middle of a write
    assert Ledger(str(tmp_path)).read("counts") == {"i": 2}  # one step older, never wrong
