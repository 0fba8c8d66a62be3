"""proxy.store's transaction loop against a scripted client: a change that meets a
conflict or fails is undone before it is tried again, never applied on top of itself;
the lease is written only by its holder; a state from a Redis that lost its data is
taken, not mistaken for one seen before. test_fleet_state.py runs a real redis-server."""

from __future__ import annotations

import json

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import WatchError

from proxy import state
from proxy.state import Latch, State
from proxy.store import Redis, Unavailable

pytestmark = pytest.mark.unit


class Script:
    """What the scripted Redis holds and does: keys, and failures to inject."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.conflicts = 0  # the next N executes raise WatchError
        self.down = False
        self.executed: list[list[tuple]] = []


class Pipe:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.queued: list[tuple] = []

    async def __aenter__(self) -> Pipe:
        return self

    async def __aexit__(self, *exc) -> None:
        self.queued = []

    async def watch(self, *keys: str) -> None:
        if self.script.down:
            raise RedisConnectionError("Connection refused")

    async def mget(self, *keys: str) -> list:
        return [self.script.keys.get(k) for k in keys]

    async def unwatch(self) -> None:
        pass

    def multi(self) -> None:
        pass

    def set(self, key: str, value: str, px: int | None = None) -> None:
        self.queued.append(("set", key, value, px))

    def lpush(self, key: str, value: str) -> None:
        self.queued.append(("lpush", key, value))

    def ltrim(self, key: str, start: int, end: int) -> None:
        self.queued.append(("ltrim", key))

    async def execute(self) -> None:
        if self.script.conflicts:
            self.script.conflicts -= 1
            raise WatchError("watched key changed")
        for op in self.queued:
            if op[0] == "set":
                self.script.keys[op[1]] = op[2]
        self.script.executed.append(self.queued)


class Client:
    def __init__(self, script: Script) -> None:
        self.script = script

    def pipeline(self, transaction: bool = True) -> Pipe:
        return Pipe(self.script)


class Replica:
    """What a controller gives `change`: a state in force, take, snapshot and undo."""

    def __init__(self) -> None:
        self.state = State(release="2.0.0")
        self.taken: list[State] = []
        self.undone = 0

    def take(self, saved: State) -> None:
        self.taken.append(saved)
        self.state = saved

    def snapshot(self) -> State:
        return self.state

    def undo(self, saved: State) -> None:
        self.undone += 1
        self.state = saved


def make(script: Script) -> Redis:
    store = Redis("redis://127.0.0.1:1/0", "t:", lease=3.0)
    store.client = Client(script)  # type: ignore[assignment]
    return store


async def change(store: Redis, r: Replica, apply) -> object:
    return await store.change("2.0.0", r.take, apply, lambda: r.state, [], r.snapshot, r.undo)


def latched(reason: str) -> State:
    return State(latch=Latch(active=True, reason=reason, at=1.0), release="2.0.0")


async def test_a_conflict_undoes_the_attempt_before_the_retry() -> None:
    script = Script()
    store, r = make(script), Replica()
    calls: list[State] = []

    def apply() -> None:
        calls.append(r.state)  # what the attempt starts from
        r.state = latched(f"attempt {len(calls)}")

    script.conflicts = 2
    await change(store, r, apply)
    assert r.undone == 2
    assert [c.latch.active for c in calls] == [False, False, False]  # never on top of itself
    written = json.loads(script.keys["t:state:2.0.0"])
    assert written["rev"] == 1 and written["state"]["latch"]["reason"] == "attempt 3"


async def test_an_action_that_raises_is_undone_and_writes_nothing() -> None:
    script = Script()
    store, r = make(script), Replica()

    def apply() -> None:
        r.state = latched("half done")
        raise ValueError("refused")

    with pytest.raises(ValueError):
        await change(store, r, apply)
    assert r.state == State(release="2.0.0") and r.undone == 1
    assert script.executed == []


async def test_only_the_lease_holder_writes_the_lease() -> None:
    script = Script()
    script.keys["t:lease:2.0.0"] = "another-replica"
    store, r = make(script), Replica()
    script.keys["t:state:2.0.0"] = json.dumps(
        {"epoch": "e", "rev": 4, "at": 1.0, "state": state.to_json(r.state)}
    )
    assert not (await change(store, r, lambda: store.may_lead()))  # someone else leads
    assert script.executed == []  # nothing changed: nothing written, lease untouched
    del script.keys["t:lease:2.0.0"]
    assert await change(store, r, lambda: store.may_lead())
    assert script.keys["t:lease:2.0.0"] == store.me and store.leading()


async def test_a_state_from_a_new_epoch_is_taken_even_at_the_same_revision() -> None:
    script = Script()
    store, r = make(script), Replica()
    r.state = latched("first")
    await change(store, r, lambda: None)  # written as rev 1 of a new epoch
    first = json.loads(script.keys["t:state:2.0.0"])
    # Redis lost its data and another replica wrote rev 1 of its own epoch:
    script.keys["t:state:2.0.0"] = json.dumps(
        {"epoch": "other", "rev": first["rev"], "at": 2.0,
         "state": state.to_json(State(release="2.0.0"))}
    )  # fmt: skip
    await change(store, r, lambda: None)
    assert r.taken and r.taken[-1].latch.active is False


async def test_unreachable_is_unavailable_and_nothing_is_applied() -> None:
    script = Script()
    script.down = True
    store, r = make(script), Replica()
    applied = []
    with pytest.raises(Unavailable, match="Connection refused"):
        await change(store, r, lambda: applied.append(1))
    assert applied == [] and not store.up and store.version is None
