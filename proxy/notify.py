"""The webhook: POST each rollback or breach event as JSON, in the background.

Rules:
- Never blocks anything: each event is sent by its own task with a per-try
  timeout and a bounded number of tries with backoff; then it is dropped and
  the failure logged.
- At most `MAX_PENDING` deliveries are in flight; beyond that new events are
  dropped (and logged) rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp

log = logging.getLogger("turnout.webhook")

TRIES = 3
TIMEOUT = 2.0  # seconds per try
BACKOFF = 0.5  # seconds before the second try, doubled after
MAX_PENDING = 32


class Webhook:
    def __init__(self, url_of) -> None:
        self.url_of = url_of  # () -> str | None: the URL in force (it follows reloads)
        self.session: aiohttp.ClientSession | None = None
        self.pending: set[asyncio.Task] = set()

    def send(self, event: dict) -> None:
        url = self.url_of()
        if not url:
            return
        if len(self.pending) >= MAX_PENDING:
            log.error("webhook backlog full: dropped %s event", event.get("kind"))
            return
        task = asyncio.get_running_loop().create_task(self.deliver(url, event))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def deliver(self, url: str, event: dict) -> bool:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))
        body = json.dumps({"source": "turnout", **event}, default=str)
        delay = BACKOFF
        for attempt in range(1, TRIES + 1):
            try:
                async with self.session.post(
                    url, data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    if resp.status < 300:
                        return True
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as err:
                problem = str(err) or err.__class__.__name__
            log.warning("webhook %s try %d/%d failed: %s", url, attempt, TRIES, problem)
            if attempt < TRIES:
                await asyncio.sleep(delay)
                delay *= 2
        log.error("webhook %s: gave up on %s event", url, event.get("kind"))
        return False

    async def close(self) -> None:
        if self.pending:
            log.warning("stopping: %d webhook deliveries still in progress are dropped",
                        len(self.pending))  # fmt: skip
        for task in list(self.pending):
            task.cancel()
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
