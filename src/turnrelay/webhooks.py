"""Sending the webhook outbox: turn ends announced, signed, at least once.

The terminal compare-and-set writes each delivery in its own transaction
(``store.submit.finish``); here every executor claims due deliveries (a lease
per claim, so one that dies mid-send leaves its deliveries due again), POSTs
them and records the attempt. A failure (no answer, a non-2xx answer, a
refused target) is retried with exponential backoff, ``retry_base`` doubling
up to ``MAX_BACKOFF_S``, for ``max_attempts`` attempts; then the delivery is
``failed``. None of it runs on a turn's path: a slow receiver never delays a
turn.

Signed as the Standard Webhooks spec says: ``webhook-id`` (the delivery's id,
the same on every retry, for the receiver to deduplicate),
``webhook-timestamp`` (unix seconds of this attempt) and ``webhook-signature``
``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` with the secret's bytes
(a ``whsec_`` secret is base64 after its prefix).

Targets: ``http(s)`` only, no redirects followed, and unless
``allow_private`` every address the host resolves to must be public (not
loopback, private, link-local, reserved or multicast), checked at submit and
again before each send (a DNS answer may have changed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from urllib.parse import urlsplit

import httpx

from turnrelay.errors import TurnrelayError, Unprocessable
from turnrelay.store.base import ExecutorStore, WebhookDelivery

log = logging.getLogger(__name__)

MAX_URL_CHARS = 2048
MAX_BACKOFF_S = 3600.0
SEND_TIMEOUT_S = 10.0
CLAIM_LEASE_S = 60.0
CLAIM_BATCH = 20


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (``whsec_<base64>``), or the
    text's own bytes for any other secret."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_") :], validate=True)
        except ValueError:
            pass
    return secret.encode()


def sign(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )


async def check_target(url: str, *, allow_private: bool) -> None:
    """Raise ``Unprocessable`` unless ``url`` is a webhook target we may call."""
    if len(url) > MAX_URL_CHARS:
        raise Unprocessable(f"webhook_url is over {MAX_URL_CHARS} characters", code="bad_webhook")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Unprocessable("webhook_url must be an http(s) URL", code="bad_webhook")
    if parts.username or parts.password:
        raise Unprocessable("webhook_url must not carry credentials", code="bad_webhook")
    if allow_private:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, port, type=socket.SOCK_STREAM
        )
    except (OSError, ValueError):
        raise Unprocessable(
            f"webhook_url host {parts.hostname!r} does not resolve", code="bad_webhook"
        ) from None
    if not infos or not all(_public(str(info[4][0])) for info in infos):
        raise Unprocessable(
            f"webhook_url host {parts.hostname!r} is a private or loopback address "
            "(TURNRELAY_WEBHOOK_ALLOW_PRIVATE allows it)",
            code="webhook_target_refused",
        )


class WebhookSender:
    """One executor's share of the outbox: claims, sends and records."""

    def __init__(
        self,
        store: ExecutorStore,
        *,
        secret: str,
        allow_private: bool = False,
        retry_base: float = 5.0,
        max_attempts: int = 8,
        poll: float = 0.5,
    ) -> None:
        self.store = store
        self.secret = secret
        self.allow_private = allow_private
        self.retry_base = retry_base
        self.max_attempts = max_attempts
        self.poll = poll
        self._stop = asyncio.Event()
        self._http: httpx.AsyncClient | None = None

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        self._http = httpx.AsyncClient(timeout=SEND_TIMEOUT_S, follow_redirects=False)
        try:
            while not self._stop.is_set():
                try:
                    claimed = await self.store.claim_webhooks(CLAIM_BATCH, CLAIM_LEASE_S)
                except TurnrelayError as exc:
                    log.warning("webhooks: claiming: %s", exc.detail)
                    claimed = []
                if claimed:
                    await asyncio.gather(*(self._deliver(d) for d in claimed))
                    continue  # more may be due
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.poll)
        finally:
            await self._http.aclose()

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        status: int | None = None
        error: str | None = None
        try:
            await check_target(delivery.url, allow_private=self.allow_private)
            status = await self._send(delivery)
            if not 200 <= status < 300:
                error = f"answered HTTP {status}"
        except Unprocessable as exc:
            error = exc.detail
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        delivered = error is None
        retry_in = None
        if not delivered and delivery.attempts < self.max_attempts:
            retry_in = min(self.retry_base * 2 ** (delivery.attempts - 1), MAX_BACKOFF_S)
        if delivered:
            log.info("webhook %s of turn %s delivered", delivery.id, delivery.turn_id)
        else:
            log.warning(
                "webhook %s of turn %s, attempt %d: %s; %s",
                delivery.id,
                delivery.turn_id,
                delivery.attempts,
                error,
                f"retrying in {retry_in:g}s" if retry_in is not None else "giving up",
            )
        try:
            await self.store.settle_webhook(
                delivery.id,
                delivery.attempts,
                delivered=delivered,
                status_code=status,
                error=error,
                retry_in=retry_in,
            )
        except TurnrelayError as exc:  # the claim's lease makes it due again
            log.warning("webhook %s: recording the attempt: %s", delivery.id, exc.detail)

    async def _send(self, delivery: WebhookDelivery) -> int:
        assert self._http is not None
        body = json.dumps(delivery.payload, separators=(",", ":")).encode()
        timestamp = int(time.time())
        response = await self._http.post(
            delivery.url,
            content=body,
            headers={
                "content-type": "application/json",
                "user-agent": "turnrelay-webhooks",
                "webhook-id": delivery.id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(self.secret, delivery.id, timestamp, body),
            },
        )
        return response.status_code
