"""proxy.config: YAML in, frozen dataclasses out, every problem with path and line."""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path

import pytest

from proxy import config
from proxy.config import (
    Compare,
    ConfigError,
    Endpoint,
    Match,
    Mirror,
    Problem,
    RolloutConfig,
    Rule,
    Step,
    Sticky,
    Token,
)
from proxy.guard import Policy

pytestmark = pytest.mark.unit

MINIMAL = """\
stable: blue
canary: green
versions:
  blue:
    endpoints: [http://127.0.0.1:9001]
  green:
    endpoints: [http://127.0.0.1:9002]
"""

FULL = """\
listen: 0.0.0.0:8080
admin:
  listen: 127.0.0.1:9901
state_file: turnout-state.json     # rollback latch and rollout progress

stable: blue
canary: green
versions:
  blue:
    endpoints: [http://127.0.0.1:9001]
  green:
    endpoints: [http://127.0.0.1:9002, http://127.0.0.1:9003]
    release: "2.4.0"

routing:
  weight: 10
  sticky:
    key: header:X-User-Id
    group: checkout
    anonymous: random
  rules:
    - name: qa
      match: {header: {X-Canary: always}}
      to: canary
    - name: beta
      match: {cohort: beta}
      to: canary
    - name: no-canary-for-payments
      match: {path_prefix: /payments, method: POST}
      to: stable
  cohorts:
    beta:
      keys: [alice, bob]
      file: cohorts/beta.txt

limits:
  connect_timeout: 2s
  response_timeout: 30s
  idle_timeout: 60s
  max_header_bytes: 16384
  max_body_bytes: 100MiB
  drain_timeout: 20s
expose_version: true
"""


def write(tmp_path: Path, text: str, name: str = "turnout.yaml") -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    """The rendered problems of a config that must be rejected."""
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


def with_routing(routing: str) -> str:
    return MINIMAL + "routing:\n" + textwrap.indent(textwrap.dedent(routing), "  ")


# ------------------------------------------------------------------------- valid


def test_full_example_parses_into_the_expected_values(tmp_path: Path) -> None:
    write(tmp_path, "# beta testers\n\n  carol  \ndave\n   \n#erin\n", "cohorts/beta.txt")
    cfg = config.load(write(tmp_path, FULL))

    assert cfg.path == str(tmp_path / "turnout.yaml")
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 8080)
    assert (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 9901)
    assert cfg.state_file == str(tmp_path / "turnout-state.json")
    assert (cfg.stable, cfg.canary) == ("blue", "green")
    assert cfg.versions["blue"].endpoints == (Endpoint("http://127.0.0.1:9001", "127.0.0.1", 9001),)
    assert [e.key for e in cfg.versions["green"].endpoints] == ["127.0.0.1:9002", "127.0.0.1:9003"]
    assert cfg.versions["green"].release == "2.4.0"
    assert cfg.versions["blue"].release is None

    routing = cfg.routing
    assert routing.weight == 10
    assert routing.sticky == Sticky("header", "X-User-Id", "checkout", "random")
    assert routing.rules == (
        Rule("qa", Match(header=(("x-canary", "always"),)), "canary"),
        Rule("beta", Match(cohort="beta"), "canary"),
        Rule("no-canary-for-payments", Match(path_prefix="/payments", method=("POST",)), "stable"),
    )
    assert dict(routing.cohorts) == {"beta": frozenset({"alice", "bob", "carol", "dave"})}
    assert routing.cohort_files == (str(tmp_path / "cohorts" / "beta.txt"),)

    limits = cfg.limits
    assert (limits.connect_timeout, limits.response_timeout) == (2.0, 30.0)
    assert (limits.idle_timeout, limits.drain_timeout) == (60.0, 20.0)
    assert limits.max_header_bytes == 16384
    assert limits.max_body_bytes == 100 * 1024 * 1024
    assert cfg.expose_version is True
    assert cfg.warnings == ()


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MINIMAL))
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 8080)
    assert cfg.admin == config.Admin("127.0.0.1", 9901)
    assert cfg.state_file == str(tmp_path / "turnout-state.json")
    assert cfg.routing == config.Routing()
    assert cfg.routing.sticky is None
    assert cfg.limits == config.Limits()
    assert cfg.expose_version is True
    assert cfg.warnings == ()


def test_parse_resolves_relative_paths_next_to_the_named_file(tmp_path: Path) -> None:
    cfg = config.parse(MINIMAL + "state_file: state/s.json\n", str(tmp_path / "c.yaml"))
    assert cfg.path == str(tmp_path / "c.yaml")
    assert cfg.state_file == str(tmp_path / "state" / "s.json")


def test_sticky_defaults_group_to_the_canary_and_anonymous_to_random(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, with_routing("sticky: {key: ip}\n")))
    assert cfg.routing.sticky == Sticky("ip", "", "green", "random")


@pytest.mark.parametrize(
    ("key", "kind", "name"),
    [("header:X-User-Id", "header", "X-User-Id"), ("cookie:uid", "cookie", "uid")]
    + [("query:user", "query", "user"), ("ip", "ip", "")],
)
def test_sticky_key_forms(tmp_path: Path, key: str, kind: str, name: str) -> None:
    text = with_routing(f"sticky: {{key: '{key}', anonymous: cookie}}\n")
    sticky = config.load(write(tmp_path, text)).routing.sticky
    assert sticky == Sticky(kind, name, "green", "cookie")


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [("127.0.0.1:9000", "127.0.0.1", 9000), ("'[::1]:8443'", "::1", 8443)]
    + [("':9000'", "0.0.0.0", 9000), ("localhost:0", "localhost", 0)],
)
def test_listen_forms(tmp_path: Path, listen: str, host: str, port: int) -> None:
    cfg = config.load(write(tmp_path, MINIMAL + f"listen: {listen}\nadmin: {{listen: {listen}}}\n"))
    assert (cfg.listen_host, cfg.listen_port) == (host, port)
    assert (cfg.admin.host, cfg.admin.port) == (host, port)


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("1.5m", 90.0), ("3", 3.0), ("0.25", 0.25)],
)
def test_durations(tmp_path: Path, written: str, seconds: float) -> None:
    cfg = config.load(write(tmp_path, MINIMAL + f"limits: {{connect_timeout: {written}}}\n"))
    assert cfg.limits.connect_timeout == seconds


@pytest.mark.parametrize(
    ("written", "size"),
    [("4096", 4096), ("2048B", 2048), ("64KiB", 65536), ("1MiB", 1 << 20)],
)
def test_sizes(tmp_path: Path, written: str, size: int) -> None:
    text = MINIMAL + f"limits: {{max_header_bytes: {written}, max_body_bytes: {written}}}\n"
    limits = config.load(write(tmp_path, text)).limits
    assert (limits.max_header_bytes, limits.max_body_bytes) == (size, size)
    big = MINIMAL + "limits: {max_body_bytes: 2GiB}\n"
    assert config.load(write(tmp_path, big)).limits.max_body_bytes == 2 << 30


def test_scalars_written_as_numbers_keep_their_text(tmp_path: Path) -> None:
    text = MINIMAL.replace("blue:\n", "blue:\n    release: 2.10\n") + textwrap.dedent(
        """\
        routing:
          sticky: {key: header:X-User}
          rules:
            - {name: r1, match: {header: {X-Canary: 1}, method: [get, Head]}, to: canary}
            - {name: r2, match: {cohort: vip, cookie: {Beta: yes}}, to: stable}
          cohorts:
            vip: {keys: [1001, 1002]}
        """
    )
    cfg = config.load(write(tmp_path, text))
    assert cfg.versions["blue"].release == "2.10"
    assert cfg.routing.rules[0].match == Match(header=(("x-canary", "1"),), method=("GET", "HEAD"))
    assert cfg.routing.rules[1].match == Match(cookie=(("Beta", "yes"),), cohort="vip")
    assert cfg.routing.cohorts["vip"] == frozenset({"1001", "1002"})


def test_expose_version_false(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, MINIMAL + "expose_version: false\n")).expose_version is False


# ------------------------------------------------------------------------ errors


def test_weight_out_of_range_renders_exactly(tmp_path: Path) -> None:
    text = MINIMAL + "routing:\n  weight: 150\n"
    assert problems(tmp_path, text) == [
        "routing.weight: must be an integer 0..100, got 150 (line 9)"
    ]


@pytest.mark.parametrize("weight", ["true", "'10'", "10.5", "-1", "[10]"])
def test_weight_must_be_a_plain_integer(tmp_path: Path, weight: str) -> None:
    [problem] = problems(tmp_path, MINIMAL + f"routing:\n  weight: {weight}\n")
    assert problem.startswith("routing.weight: must be an integer 0..100, got ")
    assert problem.endswith("(line 9)")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """\
    listen: nowhere
    stable: blue
    canary: green
    versions:
      blue:
        endpoints: [ftp://127.0.0.1:9001]
      green: {}
    routing:
      weight: 150
      sticky: {key: 'head:X', anonymous: sometimes}
    limits:
      connect_timeout: fast
      max_body_bytes: 10MB
    expose_version: maybe
    """
    found = problems(tmp_path, text)
    assert found == [
        "listen: must be HOST:PORT like 127.0.0.1:8080, [::1]:8080 or :8080, "
        "got 'nowhere' (line 1)",
        "versions.blue.endpoints[0]: must be a URL like http://127.0.0.1:9001, "
        "got 'ftp://127.0.0.1:9001' (only http, https and h2c are supported, not ftp) (line 6)",
        "versions.green.endpoints: is required (line 7)",
        "routing.weight: must be an integer 0..100, got 150 (line 9)",
        "routing.sticky.key: must be header:NAME, cookie:NAME, query:NAME or ip, "
        "got 'head:X' (line 10)",
        "routing.sticky.anonymous: must be 'random', 'stable' or 'cookie', "
        "got 'sometimes' (line 10)",
        "limits.connect_timeout: must be a duration like 500ms, 2s or 1m, got 'fast' (line 12)",
        "limits.max_body_bytes: must be a size like 16384, 64KiB or 100MiB "
        "(units B, KiB, MiB, GiB; not KB/MB/GB), got '10MB' (line 13)",
        "expose_version: must be true or false, got 'maybe' (line 14)",
    ]


def test_unknown_top_level_keys_are_errors_with_a_suggestion(tmp_path: Path) -> None:
    found = problems(tmp_path, MINIMAL + "expose_versoin: true\nfoo: 1\n")
    assert found == [
        "expose_versoin: unknown key (did you mean 'expose_version'?) (line 8)",
        "foo: unknown key (line 9)",
    ]


def test_unknown_nested_keys_are_errors_with_a_suggestion(tmp_path: Path) -> None:
    text = MINIMAL + "routing:\n  sticky: {key: ip}\n  wieght: 5\nlimits:\n  idle_timout: 5s\n"
    assert problems(tmp_path, text) == [
        "routing.wieght: unknown key (did you mean 'weight'?) (line 10)",
        "limits.idle_timout: unknown key (did you mean 'idle_timeout'?) (line 12)",
    ]
    text = MINIMAL.replace("    endpoints: [http://127.0.0.1:9002]", "    endpoint: []")
    assert problems(tmp_path, text) == [
        "versions.green.endpoint: unknown key (did you mean 'endpoints'?) (line 7)",
        "versions.green.endpoints: is required (line 7)",
    ]


def test_unknown_sections_are_errors(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, MINIMAL + "http3: {enabled: true}\n")
    assert problem.startswith("http3: unknown key")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://127.0.0.1:9001", "only http, https and h2c are supported, not ftp"),
        ("http://:9001", "the host is missing"),
        ("http://127.0.0.1:9001/api", "a path, query or fragment is not allowed"),
        ("http://127.0.0.1:9001/?a=1", "a path, query or fragment is not allowed"),
        ("http://user:pw@127.0.0.1:9001", "user info is not allowed"),
        ("127.0.0.1:9001", "the http:// scheme is missing"),
        ("http://127.0.0.1:99999", "Port out of range 0-65535"),
    ],
)
def test_bad_endpoint_urls(tmp_path: Path, url: str, why: str) -> None:
    text = MINIMAL.replace("[http://127.0.0.1:9001]", f"['{url}']")
    assert problems(tmp_path, text) == [
        f"versions.blue.endpoints[0]: must be a URL like http://127.0.0.1:9001, "
        f"got {url!r} ({why}) (line 5)"
    ]


def test_endpoint_port_defaults_to_80_and_a_slash_is_allowed(tmp_path: Path) -> None:
    text = MINIMAL.replace("[http://127.0.0.1:9001]", "[http://blue.internal/]")
    [endpoint] = config.load(write(tmp_path, text)).versions["blue"].endpoints
    assert (endpoint.host, endpoint.port, endpoint.url) == (
        "blue.internal",
        80,
        "http://blue.internal/",
    )


def test_endpoints_must_be_a_non_empty_list_without_duplicates(tmp_path: Path) -> None:
    text = MINIMAL.replace("[http://127.0.0.1:9001]", "[]").replace(
        "[http://127.0.0.1:9002]", "[http://h:1, 'http://h:1/']"
    )
    assert problems(tmp_path, text) == [
        "versions.blue.endpoints: must be a non-empty list of http://, https:// or "
        "h2c://HOST:PORT URLs, "
        "got a list (line 5)",
        "versions.green.endpoints[1]: duplicate endpoint h:1 (first on line 7) (line 7)",
    ]


def test_stable_and_canary_must_differ(tmp_path: Path) -> None:
    text = MINIMAL.replace("canary: green", "canary: blue")
    assert problems(tmp_path, text) == ["canary: must differ from stable ('blue') (line 2)"]


def test_stable_must_name_a_version(tmp_path: Path) -> None:
    text = MINIMAL.replace("stable: blue", "stable: bleu")
    assert problems(tmp_path, text) == [
        "stable: no version named 'bleu' in versions (did you mean 'blue'?) (line 1)"
    ]


def test_required_keys(tmp_path: Path) -> None:
    assert problems(tmp_path, "listen: :8080\n") == [
        "versions: is required (line 1)",
        "stable: is required (line 1)",
        "canary: is required (line 1)",
    ]


def test_version_names_are_restricted(tmp_path: Path) -> None:
    text = MINIMAL + "  'blue green':\n    endpoints: [http://127.0.0.1:9009]\n"
    assert problems(tmp_path, text) == [
        "versions.blue green: version names must match [A-Za-z0-9_.-]+ (line 8)"
    ]


def test_cohort_file_missing(tmp_path: Path) -> None:
    text = with_routing("sticky: {key: ip}\ncohorts:\n  beta:\n    file: cohorts/beta.txt\n")
    missing = tmp_path / "cohorts" / "beta.txt"
    assert problems(tmp_path, text) == [
        f"routing.cohorts.beta.file: cannot read cohort file {missing}: "
        "No such file or directory (line 12)"
    ]


def test_cohort_conditions_need_a_known_cohort_and_a_sticky_key(tmp_path: Path) -> None:
    text = with_routing(
        """\
        rules:
          - {name: beta, match: {cohort: beta}, to: canary}
          - {name: gamma, match: {cohort: gama}, to: canary}
        cohorts:
          beta: {keys: [alice]}
          gamma: {keys: [bob]}
        """
    )
    assert problems(tmp_path, text) == [
        "routing.rules[0].match.cohort: needs routing.sticky.key "
        "(cohorts are compared with the sticky key) (line 10)",
        "routing.rules[1].match.cohort: no cohort named 'gama' in routing.cohorts "
        "(did you mean 'gamma'?) (line 11)",
    ]


def test_rule_problems(tmp_path: Path) -> None:
    text = with_routing(
        """\
        rules:
          - {name: qa, match: {header: {X-Canary: always}}, to: canry}
          - {name: qa, match: {path_prefix: /x}, to: stable}
          - {name: qa, match: {}, to: canary}
          - {name: 'bad name', match: {path_prefix: x}, to: canary}
          - {match: {method: POST}}
        """
    )
    assert problems(tmp_path, text) == [
        "routing.rules[0].to: must be 'stable' or 'canary', got 'canry' (line 10)",
        "routing.rules[2].match: must have at least one condition "
        "(header, cookie, cohort, path_prefix, method) (line 12)",
        "routing.rules[3].name: must be a rule name ([A-Za-z0-9_.:-]+), got 'bad name' (line 13)",
        "routing.rules[3].match.path_prefix: must start with '/', got 'x' (line 13)",
        "routing.rules[4].name: is required (line 14)",
        "routing.rules[4].to: is required (line 14)",
    ]


def test_duplicate_rule_names(tmp_path: Path) -> None:
    text = with_routing(
        """\
        rules:
          - {name: qa, match: {path_prefix: /a}, to: canary}
          - {name: qa, match: {path_prefix: /b}, to: stable}
        """
    )
    assert problems(tmp_path, text) == [
        "routing.rules[1]: duplicate rule name 'qa' (first on line 10) (line 11)"
    ]


@pytest.mark.parametrize(
    ("key", "written", "message"),
    [
        ("idle_timeout", "0", "must be a duration greater than 0, got 0"),
        ("idle_timeout", "-1s", "must be a duration like 500ms, 2s or 1m, got '-1s'"),
        ("drain_timeout", "2h", "must be a duration like 500ms, 2s or 1m, got '2h'"),
        (
            "max_header_bytes",
            "100",
            "must be between 1KiB (1024) and 1MiB (1048576) bytes, got 100",
        ),
        (
            "max_header_bytes",
            "2MiB",
            "must be between 1KiB (1024) and 1MiB (1048576) bytes, got '2MiB'",
        ),
        ("max_body_bytes", "0", "must be greater than 0, got 0"),
        (
            "max_body_bytes",
            "1KB",
            "must be a size like 16384, 64KiB or 100MiB (units B, KiB, MiB, GiB; not KB/MB/GB), "
            "got '1KB'",
        ),
    ],
)
def test_bad_limits(tmp_path: Path, key: str, written: str, message: str) -> None:
    text = MINIMAL + f"limits:\n  {key}: {written}\n"
    assert problems(tmp_path, text) == [f"limits.{key}: {message} (line 9)"]


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, MINIMAL + "routing:\n  weight: [10\n  sticky: x\n")
    assert problem.startswith("invalid YAML: ")
    assert problem.endswith("(line 10)")


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    text = MINIMAL + "routing:\n  weight: 5\n  weight: 10\n"
    assert problems(tmp_path, text) == ["routing.weight: duplicate key (first on line 9) (line 10)"]
    assert problems(tmp_path, MINIMAL + "stable: green\n") == [
        "stable: duplicate key (first on line 1) (line 8)"
    ]


def test_the_document_must_be_a_mapping(tmp_path: Path) -> None:
    assert problems(tmp_path, "- 1\n") == ["must be a mapping, got a list (line 1)"]
    assert problems(tmp_path, "") == ["the file is empty: versions, stable and canary are required"]


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        config.load(str(missing))
    assert str(info.value) == f"cannot read config file {missing}: No such file or directory"


def test_problem_and_render_problems() -> None:
    assert str(Problem("routing.weight", "bad", 3)) == "routing.weight: bad (line 3)"
    assert str(Problem("", "bad", None)) == "bad"
    err = ConfigError([Problem("a", "x", 1), Problem("b", "y", 2)], "/etc/turnout.yaml")
    assert (
        config.render_problems(err)
        == "/etc/turnout.yaml: 2 problems\n  a: x (line 1)\n  b: y (line 2)"
    )
    assert err.problems[1] == Problem("b", "y", 2)


# ------------------------------------------------------------------ admin tokens

TOKENS = """\
admin:
  tokens:
    - {name: ci-bot, token_env: TURNOUT_TOKEN_CI, roles: [engineer]}
    - {name: pat, token_env: TURNOUT_TOKEN_PAT, roles: [product, engineer]}
    - {name: reader, token_env: TURNOUT_TOKEN_READ, roles: []}
    - {name: plain, token_env: TURNOUT_TOKEN_PLAIN}
"""


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("CI", "PAT", "READ", "PLAIN", "X"):
        monkeypatch.delenv(f"TURNOUT_TOKEN_{name}", raising=False)
    return monkeypatch


def test_tokens_read_their_secret_from_the_environment(tmp_path: Path, env) -> None:
    env.setenv("TURNOUT_TOKEN_CI", "s3cret-ci")
    env.setenv("TURNOUT_TOKEN_PAT", "s3cret-pat")
    env.setenv("TURNOUT_TOKEN_READ", "s3cret-read")
    env.setenv("TURNOUT_TOKEN_PLAIN", "s3cret-plain")
    cfg = config.load(write(tmp_path, MINIMAL + TOKENS))
    assert cfg.admin.tokens == (
        Token("ci-bot", "TURNOUT_TOKEN_CI", frozenset({"viewer", "engineer"}), "s3cret-ci"),
        Token(
            "pat", "TURNOUT_TOKEN_PAT", frozenset({"viewer", "product", "engineer"}), "s3cret-pat"
        ),
        Token("reader", "TURNOUT_TOKEN_READ", frozenset({"viewer"}), "s3cret-read"),
        Token("plain", "TURNOUT_TOKEN_PLAIN", frozenset({"viewer"}), "s3cret-plain"),
    )
    assert (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 9901)
    assert cfg.warnings == ()
    assert "s3cret" not in repr(cfg)  # secrets stay out of logs


def test_a_token_whose_variable_is_unset_or_empty_is_disabled_with_a_warning(
    tmp_path: Path, env
) -> None:
    env.setenv("TURNOUT_TOKEN_PAT", "")
    env.setenv("TURNOUT_TOKEN_READ", "r")
    env.setenv("TURNOUT_TOKEN_PLAIN", "p")
    cfg = config.load(write(tmp_path, MINIMAL + TOKENS))
    assert [t.value for t in cfg.admin.tokens] == [None, None, "r", "p"]
    assert cfg.warnings == (
        "admin.tokens[0].token_env: environment variable TURNOUT_TOKEN_CI is not set; "
        "token 'ci-bot' is disabled (line 10)",
        "admin.tokens[1].token_env: environment variable TURNOUT_TOKEN_PAT is not set; "
        "token 'pat' is disabled (line 11)",
    )


def test_token_problems(tmp_path: Path, env) -> None:
    env.setenv("TURNOUT_TOKEN_CI", "same")
    env.setenv("TURNOUT_TOKEN_X", "same")
    env.setenv("TURNOUT_TOKEN_PAT", "other")
    text = MINIMAL + textwrap.dedent(
        """\
        admin:
          tokens:
            - {name: ci-bot, token_env: TURNOUT_TOKEN_CI, roles: [engineer]}
            - {name: ci-bot, token_env: TURNOUT_TOKEN_PAT}
            - {name: copy, token_env: TURNOUT_TOKEN_X}
            - {name: bad, token_env: 'NOT-A-NAME', roles: [Admin, ok], secret: x}
            - {token_env: TURNOUT_TOKEN_PLAIN, roles: engineer}
            - {name: 'two words', token: y}
        """
    )
    found = problems(tmp_path, text)
    assert found == [
        "admin.tokens[1]: duplicate token name 'ci-bot' (first on line 10) (line 11)",
        "admin.tokens[2].token_env: TURNOUT_TOKEN_X holds the same token as 'ci-bot'; "
        "every token must differ (line 12)",
        "admin.tokens[3].token_env: must be an environment variable name "
        "([A-Za-z_][A-Za-z0-9_]*), got 'NOT-A-NAME' (line 13)",
        "admin.tokens[3].roles[0]: must be a role name ([a-z][a-z0-9_-]*), got 'Admin' (line 13)",
        "admin.tokens[3].secret: unknown key (line 13)",
        "admin.tokens[4].roles: must be a non-empty list of role names, got 'engineer' (line 14)",
        "admin.tokens[4].name: is required (line 14)",
        "admin.tokens[5].name: must be a token name ([A-Za-z0-9_.:-]+), got 'two words' (line 15)",
        "admin.tokens[5].token: unknown key (did you mean 'token_env'?) (line 15)",
        "admin.tokens[5].token_env: is required (line 15)",
    ]
    assert not any("same" in p for p in found if "holds" not in p)


def test_tokens_must_be_a_non_empty_list(tmp_path: Path) -> None:
    assert problems(tmp_path, MINIMAL + "admin: {tokens: []}\n") == [
        "admin.tokens: must be a non-empty list of tokens, got a list (line 8)"
    ]


# ------------------------------------------------------------------------- guard

GUARD = """\
guard:
  window: 45s
  min_requests: 20
  max_error_rate: 0.05
  max_p99_ms: 800
  relative_to_stable: false
  on_breach: pause
  webhook: https://hooks.example/turnout?team=checkout
"""


def test_guard_section_becomes_a_policy(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MINIMAL + GUARD))
    assert cfg.guard == Policy(
        window=45.0,
        min_requests=20,
        max_error_rate=0.05,
        max_p99_ms=800.0,
        relative_to_stable=False,
        on_breach="pause",
        webhook="https://hooks.example/turnout?team=checkout",
    )
    assert cfg.warnings == ()


def test_guard_defaults_and_absence(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, MINIMAL)).guard is None
    assert config.load(write(tmp_path, MINIMAL + "guard: {}\n")).guard == Policy()
    cfg = config.load(write(tmp_path, MINIMAL + "guard: {max_p99_ms: 0.5, on_breach: alert}\n"))
    assert cfg.guard is not None
    assert (cfg.guard.max_p99_ms, cfg.guard.on_breach, cfg.guard.window) == (0.5, "alert", 30.0)


@pytest.mark.parametrize(
    ("key", "written", "message"),
    [
        ("window", "soon", "must be a duration like 500ms, 2s or 1m, got 'soon'"),
        ("window", "0s", "must be a duration greater than 0, got '0s'"),
        ("min_requests", "0", "must be an integer >= 1, got 0"),
        ("min_requests", "2.5", "must be an integer >= 1, got 2.5"),
        ("max_error_rate", "0", "must be a number between 0 and 1 (exclusive), got 0"),
        ("max_error_rate", "1", "must be a number between 0 and 1 (exclusive), got 1"),
        ("max_error_rate", "'2%'", "must be a number between 0 and 1 (exclusive), got '2%'"),
        ("max_p99_ms", "0", "must be a number greater than 0, got 0"),
        ("max_p99_ms", "-5", "must be a number greater than 0, got -5"),
        ("max_p99_ms", ".inf", "must be a number greater than 0, got .inf"),
        ("relative_to_stable", "sometimes", "must be true or false, got 'sometimes'"),
        ("on_breach", "panic", "must be 'rollback', 'pause' or 'alert', got 'panic'"),
        (
            "webhook",
            "ftp://127.0.0.1/x",
            "must be an http:// or https:// URL with a host, got 'ftp://127.0.0.1/x'",
        ),
        (
            "webhook",
            "'http:///x'",
            "must be an http:// or https:// URL with a host, got 'http:///x'",
        ),
        (
            "webhook",
            "'http://h:99999/'",
            "must be an http:// or https:// URL, got 'http://h:99999/' (Port out of range 0-65535)",
        ),
        ("max_eror_rate", "0.1", "unknown key (did you mean 'max_error_rate'?)"),
    ],
)
def test_bad_guard_keys(tmp_path: Path, key: str, written: str, message: str) -> None:
    assert problems(tmp_path, MINIMAL + f"guard:\n  {key}: {written}\n") == [
        f"guard.{key}: {message} (line 9)"
    ]


def test_guard_must_be_a_mapping(tmp_path: Path) -> None:
    assert problems(tmp_path, MINIMAL + "guard: on\n") == [
        "guard: must be a mapping, got on (line 8)"
    ]


# ----------------------------------------------------------------------- rollout

ROLLOUT = """\
rollout:
  interval: 2m
  steps:
    - 1
    - 10
    - {weight: 50, approve: product}
    - {weight: 100, interval: 30s}
"""


def test_rollout_section_becomes_steps(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MINIMAL + ROLLOUT))
    assert cfg.rollout == RolloutConfig(
        steps=(Step(1), Step(10), Step(50, approve="product"), Step(100, interval=30.0)),
        interval=120.0,
    )
    assert cfg.warnings == ()  # no routing.weight; no tokens to check the role against


def test_rollout_defaults_and_absence(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, MINIMAL)).rollout is None
    cfg = config.load(write(tmp_path, MINIMAL + "rollout: {steps: [0, 0, 100]}\n"))
    assert cfg.rollout == RolloutConfig((Step(0), Step(0), Step(100)), 60.0)


def test_rollout_problems(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent(
        """\
        rollout:
          interval: forever
          steps:
            - 10
            - {weight: 150}
            - {approve: Product, wait: 5s}
            - {weight: 50, interval: 0}
            - 'x'
        """
    )
    assert problems(tmp_path, text) == [
        "rollout.interval: must be a duration like 500ms, 2s or 1m, got 'forever' (line 9)",
        "rollout.steps[1].weight: must be an integer 0..100, got 150 (line 12)",
        "rollout.steps[2].approve: must be a role name ([a-z][a-z0-9_-]*), got 'Product' (line 13)",
        "rollout.steps[2].wait: unknown key (did you mean 'weight'?) (line 13)",
        "rollout.steps[2].weight: is required (line 13)",
        "rollout.steps[3].interval: must be a duration greater than 0, got 0 (line 14)",
        "rollout.steps[4]: must be an integer 0..100, got 'x' (line 15)",
    ]


def test_rollout_weights_must_not_decrease(tmp_path: Path) -> None:
    steps = "    - 10\n    - 5\n    - {weight: 50}\n    - {weight: 20}\n    - 20\n"
    assert problems(tmp_path, MINIMAL + "rollout:\n  steps:\n" + steps) == [
        "rollout.steps[1]: must not be below the previous step's weight (10), got 5 (line 11)",
        "rollout.steps[3].weight: must not be below the previous step's weight (50), got 20 "
        "(line 13)",
    ]


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("rollout: {}", "rollout.steps: is required (line 8)"),
        (
            "rollout: {steps: []}",
            "rollout.steps: must be a non-empty list of steps "
            "(a weight 0..100 or {weight, approve, interval, cohorts}), got a list (line 8)",
        ),
        ("rollout: {steps: 10}", "rollout.steps: must be a non-empty list of steps "),
        (
            "rollout: {steps: [101]}",
            "rollout.steps[0]: must be an integer 0..100, got 101 (line 8)",
        ),
        ("rollout: {stepz: [1]}", "rollout.stepz: unknown key (did you mean 'steps'?) (line 8)"),
        ("rollout: [1, 10]", "rollout: must be a mapping, got a list (line 8)"),
    ],
)
def test_bad_rollout_sections(tmp_path: Path, written: str, message: str) -> None:
    found = problems(tmp_path, MINIMAL + written + "\n")
    assert any(p.startswith(message) for p in found), found


RINGS = """\
rollout:
  steps:
    - {cohorts: [internal]}
    - {cohorts: [internal, beta], approve: product}
    - 10
    - {cohorts: [everyone-else], weight: 50}
    - 100
"""
COHORTS = """\
routing:
  sticky: {key: "header:X-User-Id"}
  cohorts:
    internal: {keys: [ann, bob]}
    beta: {keys: [cy]}
    everyone-else: {keys: [dee]}
"""


def test_ring_steps_name_cohorts_and_keep_the_previous_weight(tmp_path: Path) -> None:
    # the rollout may come before routing: cohorts are checked once every section is read
    cfg = config.load(write(tmp_path, MINIMAL + RINGS + COHORTS))
    assert cfg.rollout is not None
    assert cfg.rollout.steps == (
        Step(0, cohorts=("internal",)),
        Step(0, approve="product", cohorts=("internal", "beta")),
        Step(10),
        Step(50, cohorts=("everyone-else",)),
        Step(100),
    )


def test_ring_steps_that_name_what_is_not_there_are_rejected(tmp_path: Path) -> None:
    text = MINIMAL + RINGS.replace("[internal, beta]", "[internal, betta, internal]") + COHORTS
    assert problems(tmp_path, text) == [
        "rollout.steps[1].cohorts[2]: duplicate internal (first on line 11) (line 11)",
        "rollout.steps[1].cohorts[1]: no cohort named 'betta' in routing.cohorts "
        "(did you mean 'beta'?) (line 11)",
    ]
    unkeyed = (
        MINIMAL
        + "rollout: {steps: [{cohorts: [internal]}, 100]}\n"
        + COHORTS.replace('  sticky: {key: "header:X-User-Id"}\n', "")
    )
    assert problems(tmp_path, unkeyed) == [
        "rollout.steps[0].cohorts[0]: needs routing.sticky.key "
        "(cohorts are compared with the sticky key) (line 8)"
    ]
    lower = MINIMAL + "rollout: {steps: [20, {cohorts: [beta], weight: 10}]}\n" + COHORTS
    assert problems(tmp_path, lower) == [
        "rollout.steps[1].weight: must not be below the previous step's weight (20), got 10 "
        "(line 8)"
    ]
    empty = MINIMAL + "rollout: {steps: [{cohorts: []}, {approve: product}]}\n" + COHORTS
    assert problems(tmp_path, empty) == [
        "rollout.steps[0].cohorts: must be a non-empty list of cohort names, got a list (line 8)",
        "rollout.steps[1].weight: is required (line 8)",
    ]


def test_routing_weight_beside_a_rollout_is_ignored_with_a_warning(tmp_path: Path) -> None:
    text = MINIMAL + "routing:\n  weight: 10\n" + ROLLOUT
    cfg = config.load(write(tmp_path, text))
    assert cfg.routing.weight == 10
    assert cfg.warnings == ("routing.weight: ignored because rollout owns the weight (line 9)",)
    text = MINIMAL + "routing:\n  sticky: {key: ip}\n" + ROLLOUT
    assert config.load(write(tmp_path, text)).warnings == ()


def test_an_approve_role_no_token_holds_is_warned_about(tmp_path: Path, env) -> None:
    env.setenv("TURNOUT_TOKEN_CI", "ci")
    tokens = "admin:\n  tokens:\n    - {name: ci-bot, token_env: TURNOUT_TOKEN_CI, roles: [eng]}\n"
    cfg = config.load(write(tmp_path, MINIMAL + tokens + ROLLOUT))
    assert cfg.warnings == (
        "rollout.steps[2].approve: no token in admin.tokens holds role 'product', "
        "so no one can approve this step (line 16)",
    )
    held = tokens.replace("[eng]", "[eng, product]")
    assert config.load(write(tmp_path, MINIMAL + held + ROLLOUT)).warnings == ()


def test_warnings_come_in_line_order(tmp_path: Path, env) -> None:
    tokens = "admin:\n  tokens:\n    - {name: ci-bot, token_env: TURNOUT_TOKEN_CI}\n"
    text = MINIMAL + "routing: {weight: 5}\n" + ROLLOUT + tokens
    warnings = config.load(write(tmp_path, text)).warnings
    assert [w.split(":")[0] for w in warnings] == [
        "routing.weight",
        "rollout.steps[2].approve",
        "admin.tokens[0].token_env",
    ]


def test_the_example_config_has_tokens_guard_and_rollout(env) -> None:
    path = Path(__file__).resolve().parent.parent / "config" / "turnout.yaml"
    env.setenv("TURNOUT_TOKEN_CI", "a")
    env.setenv("TURNOUT_TOKEN_PAT", "b")
    cfg = config.load(str(path))
    assert [(t.name, t.value) for t in cfg.admin.tokens] == [("ci-bot", "a"), ("pat", "b")]
    assert cfg.guard is not None and cfg.guard.on_breach == "rollback"
    assert cfg.rollout is not None and [s.weight for s in cfg.rollout.steps] == [1, 10, 50, 100]
    assert cfg.rollout.steps[2].approve == "product"
    line = next(i for i, s in enumerate(path.read_text().splitlines(), 1) if "weight: 10 " in s)
    assert cfg.warnings == (
        f"routing.weight: ignored because rollout owns the weight (line {line})",
    )


# ------------------------------------------------------------------------ mirror

MIRROR = """\
mirror:
  percent: 25
  methods: [GET, head, POST]
  max_in_flight: 8
  max_body_bytes: 4KiB
  timeout: 750ms
  compare:
    ignore_headers: [Date, Server]
    headers: [Content-Type, Cache-Control, cache-control]
    ignore_json_fields: [timestamp, meta.request_id, "items.*.id", "*.etag"]
    max_body_bytes: 2MiB
"""


def test_mirror_section_becomes_a_mirror_with_a_compare(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MINIMAL + MIRROR))
    assert cfg.mirror == Mirror(
        percent=25,
        methods=frozenset({"GET", "HEAD", "POST"}),
        max_in_flight=8,
        max_body_bytes=4096,
        timeout=0.75,
        compare=Compare(
            ignore_headers=frozenset({"date", "server"}),
            headers=("content-type", "cache-control"),
            ignore_json_fields=("timestamp", "meta.request_id", "items.*.id", "*.etag"),
            max_body_bytes=2 << 20,
        ),
    )
    assert cfg.warnings == ()


def test_mirror_defaults_and_absence(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, MINIMAL)).mirror is None
    cfg = config.load(write(tmp_path, MINIMAL + "mirror: {}\n"))
    assert cfg.mirror == Mirror()
    assert cfg.mirror.compare is None  # no compare key: no comparison
    assert cfg.mirror.methods == frozenset({"GET", "HEAD", "OPTIONS"})
    assert (cfg.mirror.percent, cfg.mirror.max_in_flight) == (100, 64)
    assert (cfg.mirror.max_body_bytes, cfg.mirror.timeout) == (65536, 5.0)
    cfg = config.load(write(tmp_path, MINIMAL + "mirror: {compare: {}}\n"))
    assert cfg.mirror == Mirror(compare=Compare())
    assert cfg.mirror.compare == Compare(frozenset(), (), (), 1048576)
    text = MINIMAL + "mirror:\n  compare: {ignore_headers: [], ignore_json_fields: []}\n"
    assert config.load(write(tmp_path, text)).mirror == Mirror(compare=Compare())
    one = config.load(write(tmp_path, MINIMAL + "mirror: {methods: get, max_body_bytes: 0}\n"))
    assert one.mirror == Mirror(methods=frozenset({"GET"}), max_body_bytes=0)


def test_mirror_problems_have_paths_and_lines(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent(
        """\
        mirror:
          percent: 150
          methods: [GET, "B@D"]
          max_in_flight: 0
          max_body_bytes: 64KB
          timeout: 0s
          sample: 5
          compare:
            ignore_headers: [Date, "bad header"]
            headers: []
            ignore_json_fields: [meta..id, "*x", meta.request_id]
            max_body_bytes: 1GiB
            ignore_fields: [x]
        """
    )
    assert problems(tmp_path, text) == [
        "mirror.percent: must be an integer 0..100, got 150 (line 9)",
        "mirror.methods[1]: must be an HTTP method ([!#$%&'*+.^_`|~0-9A-Za-z-]+), "
        "got 'B@D' (line 10)",
        "mirror.max_in_flight: must be an integer >= 1, got 0 (line 11)",
        "mirror.max_body_bytes: must be a size like 16384, 64KiB or 100MiB "
        "(units B, KiB, MiB, GiB; not KB/MB/GB), got '64KB' (line 12)",
        "mirror.timeout: must be a duration greater than 0, got '0s' (line 13)",
        "mirror.sample: unknown key (line 14)",
        "mirror.compare.ignore_headers[1]: must be a header name "
        "([!#$%&'*+.^_`|~0-9A-Za-z-]+), got 'bad header' (line 16)",
        "mirror.compare.headers: must list at least one header name "
        "(leave the key out to compare content-type) (line 17)",
        "mirror.compare.ignore_json_fields[0]: must be a dotted path of field names "
        "([A-Za-z0-9_$-]+) or * (any key or element), like meta.request_id, got 'meta..id' "
        "(line 18)",
        "mirror.compare.ignore_json_fields[1]: must be a dotted path of field names "
        "([A-Za-z0-9_$-]+) or * (any key or element), like meta.request_id, got '*x' (line 18)",
        "mirror.compare.max_body_bytes: must be between 0 and 64MiB (67108864) bytes, "
        "got '1GiB' (line 19)",
        "mirror.compare.ignore_fields: unknown key (did you mean 'ignore_json_fields'?) (line 20)",
    ]


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("mirror: on", "mirror: must be a mapping, got on (line 8)"),
        ("mirror:", "mirror: must be a mapping, got null (line 8)"),
        ("mirror: {percent: 50.5}", "mirror.percent: must be an integer 0..100, got 50.5 (line 8)"),
        (
            "mirror: {methods: []}",
            "mirror.methods: must be a non-empty list of HTTP methods, got a list (line 8)",
        ),
        ("mirror: {compare: [status]}", "mirror.compare: must be a mapping, got a list (line 8)"),
        (
            "mirror: {compare: {ignore_headers: Date}}",
            "mirror.compare.ignore_headers: must be a non-empty list of header names, "
            "got 'Date' (line 8)",
        ),
        (
            "mirror: {timeout: soon}",
            "mirror.timeout: must be a duration like 500ms, 2s or 1m, got 'soon' (line 8)",
        ),
        (
            "mirror: {max_body_bytes: -1}",
            "mirror.max_body_bytes: must be 0 or more, got -1 (line 8)",
        ),
        (
            "mirror: {percnt: 5}",
            "mirror.percnt: unknown key (did you mean 'percent'?) (line 8)",
        ),
    ],
)
def test_bad_mirror_sections(tmp_path: Path, written: str, message: str) -> None:
    assert problems(tmp_path, MINIMAL + written + "\n") == [message]


def test_mirror_warnings(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent(
        """\
        mirror:
          percent: 0
          compare:
            ignore_headers: [ETag]
            headers: [content-type, Transfer-Encoding, X-Turnout-Version, etag]
        """
    )
    cfg = config.load(write(tmp_path, text))
    assert cfg.mirror is not None and cfg.mirror.percent == 0
    assert cfg.warnings == (
        "mirror.percent: is 0, so nothing is mirrored (line 9)",
        "mirror.compare.headers[1]: transfer-encoding is never compared "
        "(hop-by-hop, framing or Turnout's own) (line 12)",
        "mirror.compare.headers[2]: x-turnout-version is never compared "
        "(hop-by-hop, framing or Turnout's own) (line 12)",
        "mirror.compare.headers[3]: etag is also in ignore_headers, so it is not compared "
        "(line 12)",
    )
    quiet = config.load(write(tmp_path, MINIMAL + "mirror: {percent: 1}\n"))
    assert quiet.warnings == ()


def test_the_example_config_has_a_mirror_with_a_compare(env) -> None:
    path = Path(__file__).resolve().parent.parent / "config" / "turnout.yaml"
    mirror = config.load(str(path)).mirror
    assert mirror is not None and mirror.compare is not None
    assert mirror == Mirror(compare=mirror.compare)  # every other key shows its default
    assert mirror.compare == Compare(
        ignore_headers=frozenset({"date", "server"}),
        headers=("content-type",),
        ignore_json_fields=("timestamp", "meta.request_id", "items.*.id"),
    )


# ------------------------------------------------------------------ hostile input


def _nested(depth: int) -> str:
    """routing.rules holding `depth` levels of flow lists (under the root and routing)."""
    return MINIMAL + "routing: {rules: " + "[" * depth + "]" * depth + "}\n"


def test_nesting_is_capped_at_64_levels_with_the_path_and_line(tmp_path: Path) -> None:
    # the root, routing, then 62 lists: 64 levels, rejected for its content only
    assert problems(tmp_path, _nested(62)) == [
        "routing.rules[0]: must be a mapping, got a list (line 8)"
    ]
    [problem] = problems(tmp_path, _nested(63))
    assert problem.endswith("nested deeper than the limit of 64 levels (line 8)"), problem
    assert problem.startswith("routing.rules[0][0]")


@pytest.mark.parametrize("depth", [5_000, 200_000])
def test_deep_nesting_is_a_problem_not_a_recursion_error(tmp_path: Path, depth: int) -> None:
    [problem] = problems(tmp_path, _nested(depth))
    assert "nested deeper than the limit of 64 levels" in problem
    block = MINIMAL + "routing:\n  " + "- " * depth + "x\n"  # block lists, one in another
    [problem] = problems(tmp_path, block)
    assert "nested deeper than the limit of 64 levels" in problem


def test_a_config_file_over_4_mib_is_rejected(tmp_path: Path) -> None:
    text = MINIMAL + "# " + "x" * (4 << 20) + "\n"
    path = write(tmp_path, text)
    assert problems(tmp_path, text) == [
        f"cannot read config file {path}: larger than the 4 MiB limit"
    ]


def test_a_cohort_file_over_its_cap_or_not_a_regular_file_is_rejected(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(config.values, "MAX_COHORT_BYTES", 1000)  # where cohort_file reads it
    (tmp_path / "big.txt").write_text("k\n" * 600)
    os.mkfifo(tmp_path / "pipe.txt")  # would block a reload for good if it were opened
    for name, why in (("big.txt", "larger than the 1000 byte limit"),
                      ("pipe.txt", "not a regular file")):  # fmt: skip
        text = with_routing(f"cohorts:\n  beta: {{file: {name}}}\n")
        assert problems(tmp_path, text) == [
            f"routing.cohorts.beta.file: cannot read cohort file {tmp_path / name}: {why} (line 10)"
        ]


@pytest.mark.parametrize(
    "written", ["2024-02-30", "9" * 5000, "!!binary '%%%'", "!!timestamp 'nope'"]
)
def test_values_that_fail_to_construct_are_problems(tmp_path: Path, written: str) -> None:
    [problem] = problems(tmp_path, MINIMAL + f"routing:\n  weight: {written}\n")
    assert problem.startswith("routing.weight: must be an integer 0..100, got ")
    assert len(problem) < 200  # a runaway value is cut short in the message


def test_any_failure_while_loading_is_a_config_error(tmp_path: Path, monkeypatch) -> None:
    def broken(ctx, node, path):
        raise MemoryError("simulated")

    monkeypatch.setitem(config.SECTIONS, "routing", broken)
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, with_routing("weight: 5\n")))
    assert str(info.value) == "cannot load the config (MemoryError: simulated)"
    assert info.value.sources  # what was read is still known to the reloader


def test_sources_are_the_digests_of_the_bytes_parsed(tmp_path: Path) -> None:
    cohort = tmp_path / "beta.txt"
    cohort.write_bytes(b"alice\r\nbob\n\n# comment\n")
    path = write(tmp_path, with_routing("cohorts:\n  beta: {file: beta.txt}\n"))
    cfg = config.load(path)
    assert cfg.routing.cohorts["beta"] == {"alice", "bob"}
    assert dict(cfg.sources) == {
        path: hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        str(cohort): hashlib.sha256(cohort.read_bytes()).hexdigest(),
    }
    cohort.unlink()
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.sources[str(cohort)] == "unreadable: No such file or directory"


# ---------------------------------------------------------------------- state backend


def test_state_backend_settings(tmp_path: Path) -> None:
    from proxy.config import StateBackend

    assert config.load(write(tmp_path, MINIMAL)).state == StateBackend()
    cfg = config.load(write(tmp_path, MINIMAL + textwrap.dedent("""\
        state:
          backend: redis
          redis: {url: "redis://10.0.0.5:6380/2", key_prefix: "turnout:shop:", lease: 5s}
        """)))  # fmt: skip
    assert cfg.state == StateBackend("redis", "redis://10.0.0.5:6380/2", "turnout:shop:", 5.0)
    assert cfg.warnings == ()
    bare = config.load(write(tmp_path, MINIMAL + "state: {backend: redis}\n"))
    assert bare.state.backend == "redis" and bare.state.redis_url == "redis://127.0.0.1:6379/0"
    assert [str(w) for w in bare.warnings] == [
        "state.redis: absent: using redis://127.0.0.1:6379/0 with key_prefix 'turnout:' (line 8)"
    ]


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("{backend: etcd}", "state.backend: must be 'file' or 'redis', got 'etcd' (line 8)"),
        (
            "{backend: redis, redis: {url: 'http://r:6379'}}",
            "state.redis.url: must be a redis://, rediss:// or unix:// URL,"
            " got 'http://r:6379' (line 8)",
        ),
        (
            "{backend: redis, redis: {lease: 200ms}}",
            "state.redis.lease: must be at least 1s (the holder renews it every controller"
            " tick), got 0.2s (line 8)",
        ),
        (
            "{backend: redis, redis: {key_prefix: 'a b'}}",
            "state.redis.key_prefix: must be a key prefix ([A-Za-z0-9_.:{}/-]{1,200}),"
            " got 'a b' (line 8)",
        ),
    ],
)
def test_bad_state_backend_settings(tmp_path: Path, state: str, message: str) -> None:
    assert problems(tmp_path, MINIMAL + f"state: {state}\n") == [message]


def test_http2_upstreams_h2c_endpoints_and_protocol(tmp_path: Path) -> None:
    green = "endpoints: [https://127.0.0.1:9002]\n    protocol: h2"
    text = MINIMAL.replace(
        "endpoints: [http://127.0.0.1:9001]", "endpoints: [h2c://127.0.0.1:9001]"
    )
    cfg = config.load(write(tmp_path, text.replace("endpoints: [http://127.0.0.1:9002]", green)))
    blue, green = cfg.versions["blue"], cfg.versions["green"]
    assert blue.protocol == "h2" and blue.endpoints[0].h2 and not blue.endpoints[0].tls
    assert blue.endpoints[0].port == 9001
    assert green.protocol == "h2" and green.endpoints[0].h2 and green.endpoints[0].tls
    mixed = MINIMAL.replace(
        "endpoints: [http://127.0.0.1:9001]",
        "endpoints: [h2c://127.0.0.1:9001, http://127.0.0.1:9003]",
    )
    [problem] = problems(tmp_path, mixed)
    assert problem.startswith("versions.blue.endpoints: mixes h2c:// with http://")
    unknown = MINIMAL.replace(
        "endpoints: [http://127.0.0.1:9002]", "endpoints: [http://127.0.0.1:9002]\n    protocol: h3"
    )
    [problem] = problems(tmp_path, unknown)
    assert problem.startswith("versions.green.protocol: must be 'http/1.1' or 'h2', got 'h3'")
