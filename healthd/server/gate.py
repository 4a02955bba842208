"""What every request passes before any route: the bearer token, then the body's size.

``Gate`` is the one place both are decided. ``healthd.server.serving``'s two doors (RSGI, which
``healthd serve`` runs, and ASGI, for tests and other servers) ask it about every request, the
report path included, before dispatching; no route checks either itself, so no route can be reached
around them.

Authentication: with ``auth.token`` set, every request needs ``Authorization: Bearer <token>``
except ``GET /metrics`` and ``GET /healthz`` (each can be protected too, for a Prometheus that sends
``authorization: {credentials: ...}``) and the OpenAPI document. The comparison is constant-time
(``hmac.compare_digest``). A refused request gets 401 with ``WWW-Authenticate: Bearer`` and a JSON
error, counted in ``healthd_unauthorized_requests_total``.

Body size: a body over ``limits.max_body_bytes`` gets 413 (counted as a rejected request, reason
``body_too_large``), whether its ``Content-Length`` announces it or it only turns out so while read.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from healthd.exposition.collector import Counters
from healthd.server.pipeline import Healthd
from healthd.settings import AuthSettings

JSON = "application/json"


@dataclass(frozen=True)
class Refusal:
    """An answer given instead of the route's: status, extra headers, JSON body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def expected_authorization(settings: AuthSettings) -> bytes | None:
    """The ``Authorization`` header value every protected request must carry; None: no token set."""
    secret = settings.token.get_secret_value() if settings.token is not None else None
    return f"Bearer {secret}".encode() if secret else None


class Gate:
    """The token and body-size checks of one instance (its settings are ``hd.settings``)."""

    def __init__(self, hd: Healthd) -> None:
        self.hd = hd
        auth = hd.settings.auth
        self.max_body = hd.settings.limits.max_body_bytes
        self._expected = expected_authorization(auth)
        self._open = {"/openapi.json"}
        if not auth.protect_metrics:
            self._open.add("/metrics")
        if not auth.protect_healthz:
            self._open.add("/healthz")

    @property
    def protected(self) -> bool:
        """Whether a token is required at all."""
        return self._expected is not None

    def check(self, path: str, authorization: bytes, content_length: str | None) -> Refusal | None:
        """None: the request may go on to its route. ``authorization``: the header's value (b"" when
        absent); ``content_length``: the header's value, None when absent."""
        if self._expected is not None and path not in self._open \
                and not hmac.compare_digest(authorization, self._expected):
            self.hd.counters.unauthorized += 1
            reason = "missing" if not authorization else "wrong"
            body = json.dumps({"error": f"{reason} bearer token: send 'Authorization: Bearer <token>' (auth.token)"})
            return Refusal(401, (("www-authenticate", 'Bearer realm="healthd"'),), body.encode())
        if content_length is not None and content_length.isdigit() and int(content_length) > self.max_body:
            return self.too_large()
        return None

    def too_large(self) -> Refusal:
        """The 413 for a body over ``limits.max_body_bytes`` (counted)."""
        counters = self.hd.counters
        Counters.inc(counters.rejected, "body_too_large")
        Counters.inc(counters.requests, "413")
        return Refusal(413, (), json.dumps({"accepted": 0, "rejected": [{"index": -1, "errors": [{
            "loc": [], "msg": f"request body over {self.max_body} bytes (limits.max_body_bytes)",
            "type": "body_too_large"}]}]}).encode())
