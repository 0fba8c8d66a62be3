"""The running proxy: listener, admin, reloads, idle sweeps, signals, drain.

Rules:
- `turnout run` = `Server.run()`: load or exit 2, listen, serve until SIGTERM
  or SIGINT, then drain: stop accepting, close idle keep-alive connections,
  send GOAWAY on HTTP/2 ones, let exchanges in flight finish up to
  `limits.drain_timeout`, exit 0.
- SIGHUP reloads, and reopens the access log (proxy.accessfile). `listen`
  and `admin.listen` are read at start only; a reload that changes them is
  applied otherwise and the log says a restart is needed for the new address.
- As one of several workers (workers.py): the listener shares its port
  (SO_REUSEPORT); the leader serves the admin API with the fleet's summed
  counts, a follower takes the leader's state and answers its counts on its
  Unix socket instead. Both start from the fleet's ledger when it has a copy
  (a worker started again), and a follower opens its socket before its
  listener: it serves no request before a change can reach it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import socket
import time

from . import native
from .accessfile import AccessWriter, LogOpenError
from .accesslog import AccessLog
from .admin.app import AdminServer
from .config import AccessLogConfig, Config
from .controller import Controller
from .history import History
from .http.downstream import ClientConnection, Served
from .http.h2 import H2Client
from .http.handshake import Acceptor
from .http.outbox import abort, flush
from .metrics import Recorder
from .mirror import Mirroring
from .notify import Webhook
from .reload import Reloader
from .runtime import Runtime
from .store import Redis
from .tls import Terminator
from .workers import LEDGER_GUARD, LEDGER_STATE, Channel, Fleet, Ledger, role_from_env

log = logging.getLogger("turnout")

SWEEP_INTERVAL = 1.0
DEADLINE_INTERVAL = 0.1


def raise_fd_limit(connections: int) -> None:
    """Raise the soft limit on open files toward the hard one: each client connection
    and its upstream connection take a descriptor each, and at the usual soft limit of
    1,024 a busy proxy would refuse connections long before `max_connections`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * connections + 256
    target = want if hard == resource.RLIM_INFINITY else min(hard, want)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
            return
        soft = target
    if soft != resource.RLIM_INFINITY and soft < connections + 256:
        log.warning(
            "open-file limit %d is below what max_connections %d needs (%d)",
            soft, connections, want,
        )  # fmt: skip


def fleet_store(config: Config) -> Redis | None:
    """The Redis the fleet shares its release state in (state.backend: redis), or None."""
    st = config.state
    if st.backend != "redis":
        return None
    return Redis(st.redis_url, st.key_prefix, st.lease)


class Server:
    def __init__(self, config: Config) -> None:
        self.runtime = Runtime(config)
        self.shared = self.runtime.shared
        self.loop = asyncio.get_running_loop()
        self.connections: set[Served] = set()
        self.listener: asyncio.base_events.Server | None = None
        self.admin: AdminServer | None = None
        self.runtime.recorder.in_flight = self.in_flight
        self.webhook = Webhook(self.webhook_url)
        self.role = role_from_env()
        follower = self.role is not None and not self.role.leader
        self.controller = Controller(
            self.runtime, notify=self.webhook.send, follower=follower,
            store=None if follower else fleet_store(config),
        )  # fmt: skip
        self.mirroring = Mirroring(self.shared, self.mismatch)
        self.fleet: Fleet | None = None
        self.channel: Channel | None = None
        self.ledger = Ledger(self.role.folder) if self.role is not None else None
        if self.role is not None and self.role.leader and self.role.count > 1:
            self.join_as_leader()
        shared = self.ledger.read(LEDGER_STATE) if self.ledger is not None else None
        self.controller.restore(shared)
        if self.fleet is not None and self.ledger is not None:
            self.controller.take_over(self.ledger.read(LEDGER_GUARD))
        self.reloader = Reloader(self.runtime, on_swap=self.applied, prepare=self.prepare)
        self.history = History()  # what /status and the dashboard show as recent traffic
        self.records = AccessLog()  # the access log's records, kept across writers
        self.access: AccessWriter | None = None  # access_log on
        self.acceptor: Acceptor | None = None  # tls on: the listener's handshakes
        self.terminator_next: Terminator | None = None  # built by `prepare`, used by `applied`
        self.stopped = asyncio.Event()
        self.ready = False

    def join_as_leader(self) -> None:
        """Lead the fleet: count over it, and share and push the state in force."""
        assert self.role is not None and self.ledger is not None
        ledger = self.ledger
        self.fleet = Fleet(self.role, self.runtime.recorder, ledger)
        self.fleet.state = self.controller.current
        self.controller.counts = self.fleet.merged
        self.controller.collect = self.fleet.sync
        self.controller.share = lambda doc: ledger.write(LEDGER_STATE, doc)
        self.controller.keep = lambda doc: ledger.write(LEDGER_GUARD, doc)

    @property
    def draining(self) -> bool:
        return self.shared.draining

    def mismatch(self, event: dict) -> None:
        self.controller.event("mismatch", **event)

    def in_flight(self) -> dict[str, int]:
        """Exchanges in progress per version, counted over the open connections."""
        counts: dict[str, int] = {}
        for conn in self.connections:
            for ex in conn.exchanges():
                counts[ex.version] = counts.get(ex.version, 0) + 1
        return counts

    def counts(self) -> Recorder:
        """The counters to show: this process's, or the whole fleet's on the leader."""
        return self.fleet.merged() if self.fleet is not None else self.runtime.recorder

    def terminator(self) -> Terminator | None:
        return self.acceptor.terminator if self.acceptor is not None else None

    def webhook_url(self) -> str | None:
        guard = self.runtime.config.guard
        return guard.webhook if guard is not None else None

    def prepare(self, new: Config) -> None:
        """Before a reload is put in force: build its TLS contexts (a failure rejects
        the reload, and the contexts in force keep serving)."""
        self.terminator_next = None
        acceptor = self.acceptor
        if acceptor is not None and new.tls is not None and new.tls != acceptor.terminator.tls:
            self.terminator_next = Terminator(new.tls)

    def applied(self, old: Config, new: Config) -> None:
        self.controller.reloaded(old, new)
        if (old.listen_host, old.listen_port) != (new.listen_host, new.listen_port):
            log.warning(
                "listen changed to %s:%s: restart to apply", new.listen_host, new.listen_port
            )
        if (old.admin.host, old.admin.port) != (new.admin.host, new.admin.port):
            log.warning("admin.listen changed: restart to apply")
        if old.state != new.state:
            log.warning("state (the backend) changed: restart to apply")
        if old.access_log != new.access_log:
            self.loop.create_task(self.log_to(new.access_log))
        if (self.acceptor is None) != (new.tls is None):
            log.warning("tls %s: restart to apply", "added" if new.tls else "removed")
        elif self.acceptor is not None and self.terminator_next is not None:
            term, self.terminator_next = self.terminator_next, None
            self.acceptor.use(term)
            names = ", ".join(c.names[0] if c.names else c.cert for c in term.tls.certificates)
            log.info("tls: new handshakes get %s", names)

    async def log_to(self, cfg: AccessLogConfig | None) -> None:
        """Start, move or stop the access log as the config in force says."""
        if self.shared.draining:
            return  # the drain closes the log; a reload meanwhile changes nothing
        writer = self.access
        if writer is not None and cfg is not None:
            if writer.target != cfg.path:
                writer.reopen(cfg.path)
            return
        if writer is not None:
            self.shared.access = self.access = None
            await writer.close()
            log.info("access log off")
        elif cfg is not None:
            try:
                self.access = AccessWriter(self.records, self.runtime.recorder, cfg.path)
            except LogOpenError as err:
                log.error("%s: the access log stays off", err)
                return
            self.access.start()
            self.shared.access = self.records
            log.info("access log on: %s", cfg.path)

    def reopen_log(self) -> None:
        """SIGHUP: the access log's file was perhaps rotated away (logrotate)."""
        if self.access is not None:
            self.access.reopen()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.runtime.config
        raise_fd_limit(cfg.limits.max_connections)
        if self.role is not None and not self.role.leader:
            self.channel = Channel(self.role, self.controller, self.runtime, self.mirroring)
            await self.channel.start()
            assert self.ledger is not None
            shared = self.ledger.read(LEDGER_STATE)  # what changed before the socket was up
            try:
                if shared is not None:
                    self.controller.adopt(shared)
            except (KeyError, TypeError, ValueError) as err:
                log.error("the fleet's copy of the state is unusable (%s): wait for a push", err)
        # The fleet's state first (state.backend redis): no request is served on a
        # state older than the fleet's.
        await self.controller.join_fleet()
        if cfg.access_log is not None:  # before serving: a log that cannot open stops the start
            self.access = AccessWriter(self.records, self.runtime.recorder, cfg.access_log.path)
            self.access.start()
            self.shared.access = self.records
        process, tap, registry = self.shared, self.mirroring, self.connections

        def prior_knowledge(transport: asyncio.Transport, data: bytes) -> None:
            H2Client(process, tap, registry, False).adopt(transport, data)

        factory = lambda: ClientConnection(process, tap, registry, False, prior_knowledge)  # noqa: E731
        if cfg.tls is not None:
            self.acceptor = Acceptor(
                Terminator(cfg.tls), process, registry,
                lambda: ClientConnection(process, tap, registry, True),
                lambda: H2Client(process, tap, registry, True),
            )  # fmt: skip
            factory = self.acceptor  # type: ignore[assignment]
        self.listener = await loop.create_server(
            factory,  # type: ignore[arg-type]  # see ClientConnection's class
            cfg.listen_host,
            cfg.listen_port,
            backlog=2048,
            reuse_address=True,
            reuse_port=self.role is not None,
        )
        for sock in self.listener.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.role is None or self.role.leader:
            self.admin = AdminServer(self)
            await self.admin.start(cfg.admin.host, cfg.admin.port)
        self.reloader.start()
        self.controller.start()
        loop.create_task(self.sweep())
        loop.create_task(self.expire())
        # Startup objects never die: keep them out of the collector's way, and
        # collect the young generation less often (the hot path makes few cycles).
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        self.ready = True
        role = self.role
        log.info(
            "turnout%s listening on %s:%s%s, admin on %s (config %s, generation %d, %s)",
            f" worker {role.index} of {role.count}" if role else "",
            cfg.listen_host, cfg.listen_port, " (TLS)" if self.acceptor else "",
            f"{cfg.admin.host}:{cfg.admin.port}" if self.admin else "the leading worker",
            cfg.path, self.runtime.snapshot.generation,
            "compiled" if native.build() == "mypyc" else "pure Python",
        )  # fmt: skip
        for source in native.stale():
            log.warning("%s changed after it was compiled: the old code runs (make build)", source)

    async def sweep(self) -> None:
        """Close connections idle past `idle_timeout`, client side and pooled."""
        while not self.stopped.is_set():
            await asyncio.sleep(SWEEP_INTERVAL)
            if self.role is not None and self.role.orphaned() and not self.draining:
                log.error("the supervisor is gone: worker %d stops", self.role.index)
                self.loop.create_task(self.drain())
            snap = self.runtime.snapshot
            if self.admin is not None:  # this process answers /status
                try:
                    self.history.sample(time.time(), self.counts(), list(snap.config.versions))
                except Exception:  # the sweep closes idle connections: it must go on
                    log.exception("history sample failed")
            limits = snap.config.limits
            timeout = limits.idle_timeout
            now = time.monotonic()
            cutoff = now - timeout
            for conn in list(self.connections):
                if conn.idle() and conn.idle_since < cutoff and not conn.head_since:
                    conn.close()
                else:
                    conn.overdue(now, limits)
            snap.upstreams.sweep(timeout)

    async def expire(self) -> None:
        """Answer 504 for exchanges whose response head is overdue."""
        while not self.stopped.is_set():
            await asyncio.sleep(DEADLINE_INTERVAL)
            awaiting = self.shared.awaiting
            if not awaiting:
                continue
            now = time.monotonic()
            late = [ex for ex in awaiting if 0 < ex.overdue_at() <= now]
            for ex in late:
                awaiting.pop(ex, None)
                ex.timed_out()

    async def drain(self) -> None:
        """Stop accepting, finish what is in flight (bounded), then stop."""
        if self.shared.draining:
            return
        self.shared.draining = True
        self.ready = False
        log.info("draining %d connections", len(self.connections))
        if self.listener is not None:
            self.listener.close()
        if self.acceptor is not None:
            self.acceptor.abort_pending()
        for conn in list(self.connections):
            conn.wind_down()  # idle: closed now; HTTP/2: GOAWAY, closed once its streams end
        deadline = time.monotonic() + self.runtime.config.limits.drain_timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            abort(conn.transport)
        await self.reloader.stop()
        await self.controller.stop()
        await self.webhook.close()
        if self.admin is not None:
            await self.admin.stop()
        if self.channel is not None:
            await self.channel.stop()
        if self.fleet is not None:
            await self.fleet.close()
        self.runtime.snapshot.upstreams.close()
        if self.access is not None:  # what was served is written before the process goes
            # Aborted exchanges and the copies their upstreams' close ends are
            # recorded as their connections' losses are delivered: a turn or two.
            for _ in range(3):
                await asyncio.sleep(0)
            writer, self.shared.access, self.access = self.access, None, None
            await writer.close()
        flush()
        self.stopped.set()
        log.info("stopped")

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(self.drain()))
        loop.add_signal_handler(signal.SIGHUP, self.hangup)
        await self.stopped.wait()

    def hangup(self) -> None:
        """SIGHUP: reload the config and reopen the access log."""
        self.reopen_log()
        self.reloader.reload("SIGHUP")
