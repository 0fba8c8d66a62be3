"""The pure routing decision: bucket compatibility, order, stickiness, policies."""

from __future__ import annotations

import math
import random

import mmh3
import pytest

from proxy.config import parse
from proxy.routing import COOKIE_NAME, RequestView, Table, bucket, decide

pytestmark = pytest.mark.unit

BASE = """
stable: blue
canary: green
versions:
  blue: {endpoints: ["http://127.0.0.1:9001"]}
  green: {endpoints: ["http://127.0.0.1:9002"]}
"""


def table(
    routing: str, weight: int | None = None, latched: bool = False, tmp=None, rings=()
) -> Table:
    cfg = parse(BASE + routing, str(tmp / "t.yaml") if tmp else "/tmp/t.yaml")
    return Table(cfg, cfg.routing.weight if weight is None else weight, latched, rings)


def view(headers=None, method="GET", path="/", query="", peer="10.0.0.1") -> RequestView:
    return RequestView(
        method, path, query, {k.lower(): v for k, v in (headers or {}).items()}, peer
    )


# -- Unleash compatibility ------------------------------------------------------------------

UNLEASH_VECTORS = [("gr1", "123", 73), ("groupX", "999", 25)]


@pytest.mark.parametrize(("group", "key", "expected"), UNLEASH_VECTORS)
def test_bucket_matches_unleash_normalized_value(group, key, expected):
    assert bucket(group, key) == expected


def _signed_bucket_js(group: str, key: str) -> int:
    """The classic mistake: a signed hash, with JavaScript's remainder semantics."""
    h = mmh3.hash(f"{group}:{key}", 0, signed=True)
    return int(math.fmod(h, 100)) + 1


def test_signed_hash_mistake_fails_the_vectors():
    wrong = [_signed_bucket_js(g, k) != e for g, k, e in UNLEASH_VECTORS]
    assert any(wrong), "the vectors must be able to catch a signed hash"


def test_bucket_range_is_1_to_100():
    seen = {bucket("g", str(i)) for i in range(5000)}
    assert min(seen) == 1 and max(seen) == 100


# -- stickiness and distribution ---------------------------------------------------------------

STICKY = """
routing:
  weight: 10
  sticky: {key: "header:X-User-Id", group: checkout}
"""


@pytest.mark.parametrize("weight", [1, 5, 10, 25, 50, 90])
def test_share_within_one_point_over_20000_keys(weight):
    t = table(STICKY, weight)
    n = 20_000
    canary = sum(decide(view({"X-User-Id": f"user-{i}"}), t).version == "green" for i in range(n))
    assert abs(100 * canary / n - weight) <= 1.0


def test_raising_weight_never_moves_a_canary_user_back():
    low, high = table(STICKY, 5), table(STICKY, 50)
    for i in range(20_000):
        v = view({"X-User-Id": f"u{i}"})
        if decide(v, low).version == "green":
            assert decide(v, high).version == "green"


def test_keyed_decision_is_deterministic_and_carries_bucket():
    t = table(STICKY)
    d1 = decide(view({"X-User-Id": "alice"}), t)
    d2 = decide(view({"X-User-Id": "alice"}), table(STICKY))
    assert (d1.version, d1.reason, d1.bucket) == (d2.version, d2.reason, d2.bucket)
    assert d1.reason == "weight" and d1.bucket == bucket("checkout", "alice")


def test_group_defaults_to_canary_name():
    t = table('routing: {weight: 50, sticky: {key: "header:X-User-Id"}}')
    assert decide(view({"X-User-Id": "bob"}), t).bucket == bucket("green", "bob")


# -- order: latch, rules, weight, anonymous ---------------------------------------------------

RULES = """
routing:
  weight: 0
  sticky: {key: "header:X-User-Id"}
  rules:
    - {name: qa, match: {header: {X-Canary: always}}, to: canary}
    - {name: beta, match: {cohort: beta}, to: canary}
    - {name: pay, match: {path_prefix: /payments, method: POST}, to: stable}
    - {name: flag, match: {cookie: {flag: "on"}}, to: canary}
  cohorts:
    beta: {keys: [alice]}
"""


def test_latch_overrides_everything():
    t = table(RULES, 100, latched=True)
    d = decide(view({"X-Canary": "always", "X-User-Id": "alice"}), t)
    assert (d.version, d.reason) == ("blue", "rollback")
    assert t.weight == 0


def test_first_matching_rule_wins():
    t = table(RULES)
    assert decide(view({"X-Canary": "always"}), t).reason == "rule:qa"
    assert decide(view({"X-User-Id": "alice"}), t).reason == "rule:beta"
    assert decide(view({"X-User-Id": "alice"}), t).version == "green"
    assert decide(view({"X-User-Id": "carol"}), t).reason == "weight"


def test_all_conditions_of_a_match_must_hold():
    t = table(RULES, 100)
    d = decide(view({"X-User-Id": "carol"}, method="POST", path="/payments/x"), t)
    assert (d.version, d.reason) == ("blue", "rule:pay")
    d = decide(view({"X-User-Id": "carol"}, method="GET", path="/payments/x"), t)
    assert d.reason == "weight"


def test_cookie_condition():
    t = table(RULES)
    d = decide(view({"Cookie": "a=1; flag=on"}), t)
    assert d.reason == "rule:flag"


def test_cohort_from_file(tmp_path):
    (tmp_path / "beta.txt").write_text("# beta testers\n\nzoe\n  yann  \n")
    routing = """
routing:
  sticky: {key: "header:X-User-Id"}
  rules: [{name: beta, match: {cohort: beta}, to: canary}]
  cohorts: {beta: {file: beta.txt}}
"""
    t = table(routing, tmp=tmp_path)
    assert decide(view({"X-User-Id": "yann"}), t).version == "green"
    assert decide(view({"X-User-Id": "# beta testers"}), t).version == "blue"


def test_anonymous_random_follows_weight():
    t = table('routing: {weight: 30, sticky: {key: "header:X-User-Id", anonymous: random}}')
    rng = random.Random(7)
    share = sum(decide(view(), t, rng.random).version == "green" for _ in range(20_000)) / 200
    assert abs(share - 30) < 1.5
    assert decide(view(), t, rng.random).reason == "random"


def test_anonymous_stable():
    t = table('routing: {weight: 100, sticky: {key: "header:X-User-Id", anonymous: stable}}')
    d = decide(view(), t)
    assert (d.version, d.reason) == ("blue", "anonymous")


def test_anonymous_cookie_issues_a_key_then_routes_by_it():
    t = table('routing: {weight: 50, sticky: {key: "header:X-User-Id", anonymous: cookie}}')
    first = decide(view(), t)
    assert first.set_cookie and first.reason == "weight"
    again = decide(view({"Cookie": f"{COOKIE_NAME}={first.set_cookie}"}), t)
    assert again.set_cookie is None
    assert (again.version, again.bucket) == (first.version, first.bucket)


@pytest.mark.parametrize(
    ("key", "req"),
    [
        ('"cookie:uid"', view({"Cookie": "uid=kim"})),
        ('"query:uid"', view(query="a=1&uid=kim")),
        ("ip", view(peer="kim")),
    ],
)
def test_key_sources(key, req):
    t = table(f"routing: {{weight: 50, sticky: {{key: {key}, group: g}}}}")
    d = decide(req, t)
    assert d.reason == "weight" and d.bucket == bucket("g", "kim")


def test_no_sticky_section_means_random_by_weight():
    t = table("routing: {weight: 0}")
    assert decide(view({"X-User-Id": "x"}), t).version == "blue"


def test_labels_are_bounded_by_config():
    t = table(RULES)
    reasons = {reason for _, reason in t.labels}
    assert reasons == {"rollback", "anonymous", "random", "weight",
                       "rule:qa", "rule:beta", "rule:pay", "rule:flag"}  # fmt: skip


def test_quick_path_agrees_with_decide():
    t = table(STICKY)
    assert t.plain
    for i in range(2000):
        headers = {"x-user-id": f"u{i}"}
        assert t.quick(headers) is decide(view({"X-User-Id": f"u{i}"}), t)
    assert t.quick({}) is None  # anonymous requests take the full path
    assert not table(RULES).plain and table(RULES).quick({"x-user-id": "a"}) is None
    assert not table(STICKY, latched=True).plain


# -- rollout rings -------------------------------------------------------------------------

RINGED = """
routing:
  sticky: {key: "header:X-User-Id"}
  cohorts:
    internal: {keys: [ann, bob]}
    beta: {keys: [bob, cy]}
  rules:
    - {name: bob-stays, match: {header: {X-Pin: stable}}, to: stable}
"""


def test_rings_come_after_rules_and_before_the_weight():
    t = table(RINGED, weight=0, rings=("internal", "beta"))
    assert not t.plain  # the quick path knows nothing of rings
    got = {k: (d.version, d.reason) for k in ("ann", "bob", "cy", "dee")
           for d in [decide(view({"X-User-Id": k}), t)]}  # fmt: skip
    assert got == {
        "ann": ("green", "ring:internal"),
        "bob": ("green", "ring:internal"),  # in both: the ring entered first names it
        "cy": ("green", "ring:beta"),
        "dee": ("blue", "weight"),
    }
    pinned = decide(view({"X-User-Id": "ann", "X-Pin": "stable"}), t)
    assert (pinned.version, pinned.reason) == ("blue", "rule:bob-stays")
    assert decide(view({}), t).reason == "random"  # no key: no ring
    assert decide(
        view({"X-User-Id": "ann"}), table(RINGED, 0, True, rings=("internal",))
    ).reason == ("rollback")
    assert ("green", "ring:beta") in t.labels and ("green", "ring:internal") in t.labels


def test_a_ring_whose_cohort_is_gone_routes_no_one():
    t = table(RINGED, weight=100, rings=("removed",))
    assert (decide(view({"X-User-Id": "ann"}), t).reason) == "weight"
