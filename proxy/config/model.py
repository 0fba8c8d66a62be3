"""The config model: the frozen dataclasses a loaded config is made of.

Rules:
- Nothing here parses: this module imports no YAML and nothing of the walker or
  the parsers; besides the standard library, only `proxy.guard` (`Policy`) and
  `proxy.headers` (the hop-by-hop names).
- Durations are seconds (float) once loaded; sizes are bytes (int).
- Paths (`Config.path`, `Config.state_file`, `Routing.cohort_files`) are
  absolute: relative ones were resolved against the config file's folder.
- Limits: the config file may hold at most `MAX_CONFIG_BYTES` (4 MiB), a
  cohort, certificate or key file at most `MAX_COHORT_BYTES` (64 MiB); the reloader reads files
  with the same limits.
- `Config.sources` maps each file a load read (the config, then its cohort,
  certificate and key files) to the SHA-256 of the exact bytes parsed (or to why it could not be
  read), so a reloader can tell what it has seen without reading the files a
  second time.
- "viewer" is implied for every token: `Token.roles` always holds `VIEWER`.
- `Config.guard` is a `proxy.guard.Policy`; `Config.rollout` a `RolloutConfig`
  whose step weights never decrease; `Config.mirror` a `Mirror` (with a
  `Compare` when `compare:` is present, even as `{}`). Each is None when its
  section is absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..guard import Policy
from ..headers import HOP_BY_HOP_NAMES

MAX_CONFIG_BYTES = 4 << 20  # a config is a few KiB; this only stops a runaway file
MAX_COHORT_BYTES = 64 << 20  # a few million keys
VIEWER = "viewer"  # the role every token holds


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str  # as written, e.g. "http://127.0.0.1:9001"
    host: str  # "127.0.0.1"
    port: int  # 9001
    tls: bool = False  # https://: TLS to the upstream (Version.tls says how)
    h2: bool = False  # HTTP/2 to the upstream: h2c://, or its version's `protocol: h2`

    @property
    def key(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """`versions.<name>.tls`: how the version's https:// endpoints are spoken to."""

    ca: str | None = None  # absolute path: trust only these CAs; None: the system's store
    ca_pem: bytes | None = field(default=None, repr=False)
    cert: str | None = None  # a client certificate (mTLS), with its key
    chain: bytes | None = field(default=None, repr=False)
    key: str | None = None
    secret: bytes | None = field(default=None, repr=False)
    server_name: str | None = None  # SNI and the name verified; None: the endpoint's host
    verify: bool = True  # False: any certificate is accepted (a warning at load)


DEFAULT_UPSTREAM_TLS = UpstreamTls()


@dataclass(frozen=True, slots=True)
class Version:
    name: str
    endpoints: tuple[Endpoint, ...]
    release: str | None = None
    tls: UpstreamTls = DEFAULT_UPSTREAM_TLS  # used by its https:// endpoints only
    protocol: str = "http/1.1"  # or "h2": every endpoint is spoken to in HTTP/2


@dataclass(frozen=True, slots=True)
class Sticky:
    kind: str  # "header" | "cookie" | "query" | "ip"
    name: str  # header/cookie/query name as written ("" for ip)
    group: str  # hash namespace; defaults to the canary's name
    anonymous: str = "random"  # "random" | "stable" | "cookie"


@dataclass(frozen=True, slots=True)
class Match:
    header: tuple[tuple[str, str], ...] = ()  # (lower-case name, exact value)
    cookie: tuple[tuple[str, str], ...] = ()  # (name, exact value)
    cohort: str | None = None
    path_prefix: str | None = None
    method: tuple[str, ...] = ()  # upper-case; empty = any


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    match: Match
    to: str  # "stable" | "canary"


@dataclass(frozen=True, slots=True)
class Routing:
    weight: int = 0
    sticky: Sticky | None = None
    rules: tuple[Rule, ...] = ()
    # cohort name -> keys (inline keys and file keys merged)
    cohorts: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))
    cohort_files: tuple[str, ...] = ()  # absolute paths, watched for reloads


@dataclass(frozen=True, slots=True)
class Limits:
    connect_timeout: float = 2.0
    response_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_header_bytes: int = 16384
    max_body_bytes: int = 100 * 1024 * 1024
    drain_timeout: float = 20.0
    # As NGINX's client_header_timeout, client_body_timeout and send_timeout.
    client_header_timeout: float = 60.0  # a request head must arrive whole within this
    client_body_timeout: float = 60.0  # longest pause between two pieces of a request body
    send_timeout: float = 60.0  # longest a client may leave a response unread
    max_connections: int = 10000  # client connections per process; beyond: 503 and close


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    token_env: str  # the environment variable holding the secret
    roles: frozenset[str]  # always includes "viewer"
    value: str | None = field(repr=False)  # None: the variable is unset, the token disabled


@dataclass(frozen=True, slots=True)
class Admin:
    host: str = "127.0.0.1"
    port: int = 9901
    tokens: tuple[Token, ...] = ()


@dataclass(frozen=True, slots=True)
class StateBackend:
    """`state:` where the latch, the rollout's progress, events and audit live."""

    backend: str = "file"  # file: `state_file`, this process (and its workers) only
    redis_url: str = "redis://127.0.0.1:6379/0"  # backend redis: the fleet's shared state
    key_prefix: str = "turnout:"
    lease: float = 3.0  # seconds: a dead rollout leader is replaced within about this


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """`access_log:` one JSON line per exchange (proxy.accessfile)."""

    path: str  # absolute, or "-": standard output
    format: str = "json"


@dataclass(frozen=True, slots=True)
class Certificate:
    """One certificate served on `listen` (proxy.tls), with the bytes read for it."""

    cert: str  # absolute path of the PEM chain, leaf first
    key: str  # absolute path of the PEM private key
    chain: bytes = field(repr=False)  # what was read and checked: a renewal is a new config
    secret: bytes = field(repr=False)
    names: tuple[str, ...] = ()  # lower-case DNS names it serves; "*." covers one label
    not_after: float = 0.0  # UNIX time it expires


@dataclass(frozen=True, slots=True)
class Tls:
    """`tls:` terminate TLS on `listen`. SNI picks the first certificate whose names
    match; the first is the default (no SNI, or no match)."""

    certificates: tuple[Certificate, ...]  # at least one
    alpn: tuple[str, ...] = ("http/1.1",)
    min_version: str = "1.2"  # "1.2" or "1.3"
    handshake_timeout: float = 10.0  # seconds from accept to the end of the handshake


@dataclass(frozen=True, slots=True)
class Http2:
    """`http2:` HTTP/2 on the listener, for clients that choose it (ALPN `h2` over TLS,
    or prior knowledge in cleartext with `cleartext: true`)."""

    cleartext: bool = False  # accept h2c prior knowledge on a plain listener
    max_concurrent_streams: int = 100  # streams one client may have open at once


@dataclass(frozen=True, slots=True)
class Step:
    weight: int  # 0..100, never below the previous step's
    approve: str | None = None  # the role whose `promote` enters this step
    interval: float | None = None  # this step's dwell; None: RolloutConfig.interval
    # a ring: cohorts routed to the canary from this step on (`ring:<cohort>`), on top of
    # the weight; a ring step without a weight keeps the previous step's (0 at first)
    cohorts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    steps: tuple[Step, ...]  # at least one
    interval: float = 60.0  # the default dwell at each step, seconds


# Which response headers a comparison looks at (docs/mirror.md): `Compare.headers`
# when the operator lists any, else COMPARED_BY_DEFAULT; always minus
# `ignore_headers` and minus the names below, which the proxy itself strips or
# rewrites (hop-by-hop, framing: the body comparison covers the length) and any
# `x-turnout-*` header.
COMPARED_BY_DEFAULT: tuple[str, ...] = ("content-type",)
NEVER_COMPARED: frozenset[str] = frozenset(
    {name.decode("ascii") for name in HOP_BY_HOP_NAMES} | {"content-length"}
)
NEVER_COMPARED_PREFIX = "x-turnout-"


@dataclass(frozen=True, slots=True)
class Compare:
    ignore_headers: frozenset[str] = frozenset()  # lower-case names
    headers: tuple[str, ...] = ()  # lower-case names to compare (opt-in); () = COMPARED_BY_DEFAULT
    ignore_json_fields: tuple[str, ...] = ()  # dotted paths, e.g. "meta.request_id", "items.*.id"
    max_body_bytes: int = 1048576  # bodies up to this compared exactly; larger ones by digest


@dataclass(frozen=True, slots=True)
class Mirror:
    percent: int = 100  # 0..100
    methods: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS"})  # upper-case
    max_in_flight: int = 64  # >= 1
    max_body_bytes: int = 65536  # request bodies larger than this are not mirrored (>= 0)
    timeout: float = 5.0  # seconds, > 0
    compare: Compare | None = None  # None: no comparison


@dataclass(frozen=True, slots=True)
class Config:
    path: str  # absolute path of the file this came from
    stable: str
    canary: str
    versions: Mapping[str, Version]
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    admin: Admin = Admin()
    state_file: str = ""  # absolute
    routing: Routing = Routing()
    limits: Limits = Limits()
    expose_version: bool = True
    warnings: tuple[str, ...] = ()
    guard: Policy | None = None  # None: no automatic verdict
    rollout: RolloutConfig | None = None  # None: routing.weight is the weight
    mirror: Mirror | None = None  # None: no shadow traffic
    state: StateBackend = StateBackend()
    access_log: AccessLogConfig | None = None  # None: no access log
    tls: Tls | None = None  # None: cleartext on `listen`
    http2: Http2 = Http2()
    # file -> digest of the bytes parsed (see walker.digest); compare=False: two loads of
    # the same settings are the same config whatever bytes they came from
    sources: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )
