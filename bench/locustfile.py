"""Locust: simulated users with stable ids must each stay on one version.

Every simulated user gets a stable id (``user-1``, ``user-2``, ...) and sends
``GET /`` with ``X-User-Id: <id>``; the proxy routes it by that sticky key and
answers with ``X-Turnout-Version``. The first version a user sees is theirs:

- a response naming another version is a *flip* (a failed request);
- a 2xx response without the header counts as version ``none``. It is a flip
  only if that user has seen a version before (the header disappeared); a user
  that never sees the header (an upstream hit directly) is consistent.
- non-2xx responses are failures but say nothing about stickiness.

When the test stops it prints the per-version shares (of responses and of
users) and the flip count, and sets the exit status to 1 if any user flipped.

    locust -f bench/locustfile.py --headless -u 50 -r 50 -t 10s \\
        --host http://127.0.0.1:8080 --only-summary

The check runs per process: with distributed workers each worker judges and
reports its own users.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

from locust import FastHttpUser, between, events, task
from locust.runners import MasterRunner

HEADER = "X-Turnout-Version"
NONE = "none"

_user_numbers = itertools.count(1)


def judge(mine: str | None, seen: str) -> tuple[str | None, str | None]:
    """(the user's version after this response, a problem or None).

    `mine` is the version the user was first served with a header (None while
    they have only seen responses without it); `seen` is this response's header
    value, or NONE.
    """
    if seen == NONE:
        if mine is None:
            return None, None
        return mine, f"{HEADER} missing, but this user was on {mine}"
    if mine is None:
        return seen, None
    if seen != mine:
        return mine, f"version flipped: {mine} -> {seen}"
    return mine, None


@dataclass
class Tally:
    responses: Counter[str] = field(default_factory=Counter)  # 2xx responses per version
    users: dict[str, str] = field(default_factory=dict)  # user id -> first version seen
    flips: int = 0
    flipped_users: set[str] = field(default_factory=set)
    reported: bool = False

    def record(self, user_id: str, seen: str, problem: str | None) -> None:
        self.responses[seen] += 1
        self.users.setdefault(user_id, seen)
        if seen != NONE and self.users[user_id] == NONE:
            self.users[user_id] = seen  # first real version after header-less answers
        if problem:
            self.flips += 1
            self.flipped_users.add(user_id)

    def summary(self) -> str:
        lines = ["", "Sticky routing check (X-User-Id -> X-Turnout-Version)"]
        for title, counts in (
            ("2xx responses", self.responses),
            ("users", Counter(self.users.values())),
        ):
            total = sum(counts.values()) or 1
            shares = ", ".join(
                f"{v} {n:,} ({100 * n / total:.1f}%)" for v, n in sorted(counts.items())
            )
            lines.append(f"  {title:<14} {shares or '(none)'}")
        verdict = "FAIL" if self.flips else "ok"
        lines.append(
            f"  flips          {self.flips} in {len(self.flipped_users)} of "
            f"{len(self.users)} users: {verdict}"
        )
        return "\n".join(lines)


TALLY = Tally()


class StickyUser(FastHttpUser):
    wait_time = between(0.02, 0.1)

    def on_start(self) -> None:
        self.user_id = f"user-{next(_user_numbers)}"
        self.version: str | None = None

    @task
    def get_root(self) -> None:
        with self.client.get(
            "/",
            headers={"X-User-Id": self.user_id},
            name="/ (sticky)",
            catch_response=True,
        ) as resp:
            if not 200 <= (resp.status_code or 0) < 300:
                resp.failure(f"HTTP {resp.status_code}")
                return
            seen = resp.headers.get(HEADER) or NONE
            self.version, problem = judge(self.version, seen)
            TALLY.record(self.user_id, seen, problem)
            if problem:
                resp.failure(problem)
            else:
                resp.success()


@events.test_start.add_listener
def _reset(environment, **_kwargs) -> None:
    global TALLY
    TALLY = Tally()


def _conclude(environment) -> None:
    if isinstance(environment.runner, MasterRunner):
        return  # the workers hold the users and report them
    if TALLY.flips:
        environment.process_exit_code = 1
    if not TALLY.reported:
        TALLY.reported = True
        print(TALLY.summary(), flush=True)


@events.test_stop.add_listener
def _on_test_stop(environment, **_kwargs) -> None:
    _conclude(environment)


@events.quitting.add_listener
def _on_quitting(environment, **_kwargs) -> None:
    _conclude(environment)  # the exit status is decided after this event
