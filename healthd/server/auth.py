"""Optional bearer-token authentication, as pure ASGI middleware.

With ``auth.token`` set, every request needs ``Authorization: Bearer <token>``
except ``GET /metrics`` and ``GET /healthz`` (each can be protected too, for a
Prometheus that sends ``authorization: {credentials: ...}``) and the OpenAPI
document. The comparison is constant-time (``hmac.compare_digest``). A refused
request gets 401 with ``WWW-Authenticate: Bearer`` and a JSON error; it is counted
in ``healthd_unauthorized_requests_total``. TLS is uvicorn's job (see docs).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from healthd.settings import AuthSettings


def expected_authorization(settings: AuthSettings) -> bytes | None:
    """The ``Authorization`` header value every protected request must carry; None: no token set."""
    secret = settings.token.get_secret_value() if settings.token is not None else None
    return f"Bearer {secret}".encode() if secret else None


def given_authorization(headers: list[tuple[bytes, bytes]]) -> bytes:
    """A request's ``Authorization`` header (names lower-case, as ASGI has them); b"" when absent."""
    for name, value in headers:
        if name == b"authorization":
            return value
    return b""


def authorized(headers: list[tuple[bytes, bytes]], expected: bytes | None) -> bool:
    """Whether a request with these headers may pass (constant-time comparison)."""
    return expected is None or hmac.compare_digest(given_authorization(headers), expected)


class BearerAuth:
    """Refuse requests without the configured bearer token."""

    def __init__(self, app: ASGIApp, settings: AuthSettings, on_refused: Callable[[], None] = lambda: None) -> None:
        self.app = app
        self._expected = expected_authorization(settings)
        self._open = {"/openapi.json"}
        if not settings.protect_metrics:
            self._open.add("/metrics")
        if not settings.protect_healthz:
            self._open.add("/healthz")
        self._on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._expected is None or scope["type"] != "http" or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        given = given_authorization(scope["headers"])
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        self._on_refused()
        reason = "missing" if not given else "wrong"
        body = json.dumps({"error": f"{reason} bearer token: send 'Authorization: Bearer <token>' (auth.token)"})
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"www-authenticate", b'Bearer realm="healthd"'),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body.encode()})
