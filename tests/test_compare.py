"""proxy.compare: is the shadow response the same as the primary one?"""

from __future__ import annotations

import hashlib
import json

import pytest

from proxy.compare import Captured, Outcome, compare, compared_headers, excerpt, json_diff
from proxy.config import Compare

pytestmark = pytest.mark.unit

JSON = (("content-type", "application/json"),)


def captured(
    body: bytes | object = b"",
    status: int = 200,
    headers: tuple[tuple[str, str], ...] = JSON,
    limit: int | None = None,
) -> Captured:
    """A response as the mirror captures it: the first `limit` bytes, the full length and digest."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    kept = raw if limit is None else raw[:limit]
    return Captured(status, headers, kept, len(raw), hashlib.sha256(raw).hexdigest())


def match() -> Outcome:
    return Outcome("match", None, {})


# ------------------------------------------------------------------------ status


def test_a_status_difference_is_reported_first() -> None:
    primary = captured({"a": 1}, 200)
    shadow = captured(b"<html>oops</html>", 500, (("content-type", "text/html"),))
    assert compare(primary, shadow, Compare()) == Outcome(
        "mismatch", "status", {"primary": 200, "shadow": 500}
    )


# ----------------------------------------------------------------------- headers


def test_only_compared_headers_count_and_date_is_not_one_by_default() -> None:
    base = (("content-type", "application/json"), ("date", "Mon, 01 Jan 2024 00:00:00 GMT"))
    other = (("content-type", "application/json"), ("date", "Mon, 01 Jan 2024 00:00:01 GMT"))
    extra = (*other, ("server", "green/2.4"), ("x-request-id", "abc"))
    assert (
        compare(captured({"a": 1}, headers=base), captured({"a": 1}, headers=extra), Compare())
        == match()
    )


def test_the_default_compared_header_is_content_type() -> None:
    shadow = captured({"a": 1}, headers=(("content-type", "text/plain"),))
    assert compare(captured({"a": 1}), shadow, Compare()) == Outcome(
        "mismatch",
        "headers",
        {"content-type": {"primary": "application/json", "shadow": "text/plain"}},
    )


def test_listed_headers_replace_the_default_and_a_missing_one_differs() -> None:
    cfg = Compare(headers=("cache-control", "x-api-version"))
    primary = captured(b"ok", headers=(("cache-control", "max-age=60"), ("x-api-version", "2")))
    shadow = captured(b"ok", headers=(("cache-control", "max-age=60"), ("content-type", "x/y")))
    assert compare(primary, shadow, cfg) == Outcome(
        "mismatch", "headers", {"x-api-version": {"primary": "2", "shadow": None}}
    )


def test_header_names_are_case_insensitive_and_values_exact() -> None:
    cfg = Compare(headers=("X-Api-Version",))
    primary = captured(b"ok", headers=(("x-api-version", "2"),))
    assert compare(primary, captured(b"ok", headers=(("X-API-Version", "2"),)), cfg) == match()
    differs = compare(primary, captured(b"ok", headers=(("x-api-version", "2 "),)), cfg)
    assert differs.kind == "headers"


def test_repeated_headers_are_compared_in_order() -> None:
    cfg = Compare(headers=("vary",))
    primary = captured(b"ok", headers=(("vary", "a"), ("vary", "b")))
    shadow = captured(b"ok", headers=(("vary", "b"), ("vary", "a")))
    assert compare(primary, shadow, cfg).detail == {"vary": {"primary": "a, b", "shadow": "b, a"}}


def test_ignored_hop_by_hop_framing_and_turnout_headers_are_never_compared() -> None:
    cfg = Compare(
        headers=("content-type", "content-length", "connection", "x-turnout-version", "etag"),
        ignore_headers=frozenset({"etag"}),
    )
    assert compared_headers(cfg) == ("content-type",)
    assert compared_headers(Compare()) == ("content-type",)
    assert compared_headers(Compare(ignore_headers=frozenset({"content-type"}))) == ()
    primary = captured({"a": 1}, headers=(*JSON, ("content-length", "8"), ("etag", '"1"')))
    shadow = captured({"a": 1}, headers=(*JSON, ("transfer-encoding", "chunked"), ("etag", '"2"')))
    assert compare(primary, shadow, cfg) == match()


# ------------------------------------------------------------------- JSON bodies


def test_identical_json_except_an_ignored_nested_field_matches() -> None:
    cfg = Compare(ignore_json_fields=("meta.request_id",))
    primary = captured({"meta": {"request_id": "a1", "page": 1}, "items": [1, 2]})
    shadow = captured({"meta": {"request_id": "b7", "page": 1}, "items": [1, 2]})
    assert compare(primary, shadow, cfg) == match()
    assert compare(primary, shadow, Compare()).detail["paths"] == ["meta.request_id"]


def test_a_nested_difference_is_reported_with_its_dotted_path_and_excerpts() -> None:
    primary = captured({"order": {"lines": [{"sku": "A", "qty": 1}], "total": 10}})
    shadow = captured({"order": {"lines": [{"sku": "A", "qty": 2}], "total": 10}})
    outcome = compare(primary, shadow, Compare())
    assert (outcome.result, outcome.kind) == ("mismatch", "body")
    assert outcome.detail == {
        "paths": ["order.lines.0.qty"],
        "primary_excerpt": '{"order": {"lines": [{"sku": "A", "qty": 1}], "total": 10}}',
        "shadow_excerpt": '{"order": {"lines": [{"sku": "A", "qty": 2}], "total": 10}}',
    }
    json.dumps(outcome.detail)  # JSON-safe


def test_key_order_and_whitespace_do_not_matter_and_numbers_compare_by_value() -> None:
    primary = captured(b'{"a": 1, "b": [1, 2.5], "c": {"x": null, "y": true}}')
    shadow = captured(b'{\n  "c": {"y": true, "x": null},\n  "b": [1.0, 2.50],\n  "a": 1.0\n}')
    assert compare(primary, shadow, Compare()) == match()


def test_a_boolean_never_equals_a_number() -> None:
    assert json_diff({"ok": True, "n": 0}, {"ok": 1, "n": False}, ()) == ["ok", "n"]
    assert json_diff([1, 1.0, 0], [True, True, None], ()) == ["0", "1", "2"]


def test_wildcard_ignores_any_key_or_array_element() -> None:
    primary = {"items": [{"id": "u1", "name": "a"}, {"id": "u2", "name": "b"}]}
    shadow = {"items": [{"id": "x9", "name": "a"}, {"id": "x8", "name": "c"}]}
    assert json_diff(primary, shadow, ("items.*.id",)) == ["items.1.name"]
    assert json_diff(primary, shadow, ()) == ["items.0.id", "items.1.id", "items.1.name"]
    keyed = ({"a": {"ts": 1, "v": 1}, "b": {"ts": 2}}, {"a": {"ts": 3, "v": 1}, "b": {"ts": 4}})
    assert json_diff(*keyed, ("*.ts",)) == []
    assert json_diff(*keyed, ("ts",)) == ["a.ts", "b.ts"]  # a path names one place, not any depth
    cfg = Compare(ignore_json_fields=("items.*.id",))
    assert compare(captured(primary), captured(shadow), cfg).detail["paths"] == ["items.1.name"]


def test_arrays_of_different_length_report_each_missing_index() -> None:
    assert json_diff({"items": [1, 2, 3]}, {"items": [1]}, ()) == ["items.1", "items.2"]
    assert json_diff({"items": []}, {"items": [{"id": 1}]}, ()) == ["items.0"]
    assert json_diff([1, 2, 3], [1], ("1", "2")) == []  # an ignored index on one side only


def test_missing_keys_type_changes_and_the_root() -> None:
    assert json_diff({"a": 1}, {"b": 1}, ()) == ["a", "b"]
    assert json_diff({"a": {"b": 1}}, {"a": [1]}, ()) == ["a"]
    assert json_diff({"a": "1"}, {"a": 1}, ()) == ["a"]
    assert json_diff([1], {"0": 1}, ()) == [""]
    assert json_diff(1, 2, ()) == [""]
    assert json_diff(None, None, ()) == []
    assert json_diff({"a": {"b": 1}}, {"a": {}}, ("a.b",)) == []


def test_paths_are_depth_first_and_bounded() -> None:
    a = {"x": list(range(50)), "y": 1}
    b = {"x": [-n for n in range(1, 51)], "y": 2}
    assert json_diff(a, b, (), limit=3) == ["x.0", "x.1", "x.2"]
    outcome = compare(captured(a), captured(b), Compare())
    assert outcome.detail["paths"] == [f"x.{i}" for i in range(20)]


def test_json_diff_leaves_its_arguments_alone() -> None:
    a, b = {"items": [{"id": 1}], "m": {"t": 1}}, {"items": [{"id": 2}], "m": {"t": 2}}
    assert json_diff(a, b, ("items.*.id", "m.t", "m")) == []
    assert a == {"items": [{"id": 1}], "m": {"t": 1}}


def test_bodies_starting_like_json_are_tried_as_json_without_a_json_content_type() -> None:
    text = (("content-type", "text/plain"),)
    primary = captured(b'{"a": 1, "b": 2}', headers=text)
    assert compare(primary, captured(b'{"b": 2, "a": 1}', headers=text), Compare()) == match()
    assert compare(primary, captured(b'{"b": 3, "a": 1}', headers=text), Compare()).detail[
        "paths"
    ] == ["b"]


def test_invalid_json_falls_back_to_the_digest() -> None:
    primary, shadow = captured(b'{"a": 1'), captured(b'{"a":  1')
    outcome = compare(primary, shadow, Compare())
    assert (outcome.kind, outcome.detail["primary_digest"]) == ("body", primary.digest)
    assert compare(primary, captured(b'{"a": 1'), Compare()) == match()


# ----------------------------------------------------------------- other bodies


def test_a_non_json_body_difference_is_a_digest_mismatch_with_excerpts() -> None:
    html = (("content-type", "text/html; charset=utf-8"),)
    primary = captured(b"<p>Hello\nworld</p>", headers=html)
    shadow = captured(b"<p>Hello\nWorld!</p>", headers=html)
    outcome = compare(primary, shadow, Compare())
    assert outcome == Outcome(
        "mismatch",
        "body",
        {
            "primary_digest": primary.digest,
            "shadow_digest": shadow.digest,
            "primary_excerpt": "<p>Hello\\nworld</p>",
            "shadow_excerpt": "<p>Hello\\nWorld!</p>",
            "primary_length": 18,
            "shadow_length": 19,
        },
    )
    assert compare(primary, captured(b"<p>Hello\nworld</p>", headers=html), Compare()) == match()


def test_truncated_or_large_bodies_are_compared_by_digest() -> None:
    big = {"rows": [{"n": i, "at": f"2024-01-01T00:00:{i % 60:02d}"} for i in range(200)]}
    reordered = json.dumps(big, indent=1).encode()  # the same JSON, other bytes
    cfg = Compare(ignore_json_fields=("rows.*.at",))
    assert compare(captured(big), captured(reordered), cfg) == match()  # complete: as JSON
    truncated = compare(captured(big, limit=1000), captured(reordered, limit=1000), cfg)
    assert (truncated.result, truncated.kind) == ("mismatch", "body")
    assert set(truncated.detail) >= {"primary_digest", "shadow_digest", "primary_length"}
    assert truncated.detail["primary_excerpt"].endswith("…")
    over = Compare(ignore_json_fields=("rows.*.at",), max_body_bytes=100)
    assert compare(captured(big), captured(reordered), over).kind == "body"
    assert compare(captured(big, limit=10), captured(big, limit=10), over) == match()  # digests


def test_empty_bodies_such_as_head_responses_match() -> None:
    head = Captured(200, JSON, b"", 0, hashlib.sha256(b"").hexdigest())
    assert compare(head, head, Compare()) == match()
    assert compare(captured(b"", 204, ()), captured(b"", 204, ()), Compare()) == match()


# ---------------------------------------------------------------------- excerpt


@pytest.mark.parametrize(
    ("body", "limit", "text"),
    [
        (b"plain", 200, "plain"),
        (b"line\r\n\tend\x00", 200, "line\\r\\n\\tend\\x00"),
        (b"abcdef", 4, "abcd…"),
        ("héllo wörld".encode(), 5, "héllo…"),
        (b"\xff\xfeok", 200, "\ufffd\ufffdok"),
        (b"", 200, ""),
        (b"a\nb", 2, "a…"),  # an escape is not split
    ],
)
def test_excerpt(body: bytes, limit: int, text: str) -> None:
    assert excerpt(body, limit) == text


def test_excerpt_of_a_long_body_is_bounded() -> None:
    assert excerpt(b"x" * 10_000) == "x" * 200 + "…"
    assert excerpt("€".encode() * 1000, 10) == "€" * 10 + "…"
