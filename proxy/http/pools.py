"""Every upstream pool of one config: built anew on reload, reusing what did not change.

Rules:
- One pool per endpoint and the way it is spoken to: HTTP/1.1 (proxy.http.upstream)
  or HTTP/2 (proxy.http.h2up), cleartext or TLS with its version's settings. A
  pool is kept across a reload only while all of that is unchanged; the others
  are retired (their idle connections close, busy ones once they are done).
"""

from __future__ import annotations

import ssl
import time

from ..config import Config, UpstreamTls
from ..tls import client_context
from .h2up import H2Dialer, H2Pool
from .upstream import TCP, Dialer, Pool, TlsDialer, VersionPools


class Upstreams:
    """All pools of one config; built anew on reload, reusing unchanged endpoints."""

    def __init__(
        self, config: Config, previous: Upstreams | None = None, dialer: Dialer = TCP
    ) -> None:
        old = previous.by_endpoint if previous else {}
        # One pool per endpoint and the way it is spoken to: an https:// endpoint's
        # pool is kept across a reload only while its version's TLS settings are.
        self.by_endpoint: dict[object, Pool] = {}
        self.versions: dict[str, VersionPools] = {}
        contexts: dict[tuple[UpstreamTls, str], ssl.SSLContext] = {}

        def context(tls: UpstreamTls, alpn: str) -> ssl.SSLContext:
            if (tls, alpn) not in contexts:
                contexts[tls, alpn] = client_context(tls, alpn)
            return contexts[tls, alpn]

        for name, version in config.versions.items():
            pools: list[Pool] = []
            for ep in version.endpoints:
                key: object = ep.key  # cleartext HTTP/1.1: the endpoint alone
                if ep.tls:
                    key = (ep.key, "h2", version.tls) if ep.h2 else (ep.key, version.tls)
                elif ep.h2:
                    key = (ep.key, "h2")
                pool = self.by_endpoint.get(key) or old.get(key)
                if pool is None:
                    tls = version.tls
                    if ep.h2:
                        ctx = context(tls, "h2") if ep.tls else None
                        pool = H2Pool(ep, H2Dialer(ctx, tls.server_name))
                    elif ep.tls:
                        pool = Pool(ep, TlsDialer(context(tls, "http/1.1"), tls.server_name))
                    else:
                        pool = Pool(ep, dialer)
                self.by_endpoint[key] = pool
                pools.append(pool)
            vp = VersionPools(name, pools)
            vp.h2 = bool(pools) and all(isinstance(p, H2Pool) for p in pools)
            self.versions[name] = vp
        for was, pool in old.items():
            if was not in self.by_endpoint:
                pool.retire()

    def sweep(self, idle_timeout: float) -> None:
        before = time.monotonic() - idle_timeout
        for pool in self.by_endpoint.values():
            pool.sweep(before)

    def close(self) -> None:
        for pool in self.by_endpoint.values():
            pool.retire()
