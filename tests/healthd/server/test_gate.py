"""healthd.server.gate: no route, fast or not, answers without the token when one is set; bodies over
the limit are refused at every route.

The routes are enumerated from the app itself (its router, which holds ``POST /v1/reports`` too, plus
``serving.REPORTS_PATH``, the path the RSGI door answers without the router), so a route added later
is covered without touching this test. Requests go to a real served instance (granian, RSGI, as
``healthd serve``) and to the ASGI door.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import httpx
import pytest
from starlette.routing import Route

from healthd.server.app import create_app
from healthd.server.embedded import Embedded, serve_in_thread
from healthd.server.serving import REPORTS_PATH, HealthdApp
from healthd.settings import Settings

TOKEN = "s3cret-token"
PROTECTED = Settings.from_mapping({"auth": {"token": TOKEN, "protect_metrics": True, "protect_healthz": True}})
ALWAYS_OPEN = {"/openapi.json"}  # the API description is not a secret


def _every_route(app: HealthdApp) -> list[tuple[str, str]]:
    """(method, path) for every method of every route, path parameters filled in; the RSGI door's own
    path first; and a path no route has (the gate comes before the router's 404)."""
    out = [("POST", REPORTS_PATH)]
    for route in app.routes:
        assert isinstance(route, Route), f"a route the test cannot enumerate: {route!r}"
        path = re.sub(r"\{[^}]+\}", "some-job", route.path)
        out += [(method, path) for method in sorted(route.methods or ()) if (method, path) not in out]
    return [*out, ("GET", "/no/such/path")]


def _batch() -> bytes:
    return json.dumps({"schema_version": 1, "reports": [
        {"kind": "step", "job": "gate", "rank": 0, "time": 1.0, "step": 0, "loss": 1.0}]}).encode()


@pytest.fixture(scope="module")
def protected() -> Iterator[Embedded]:
    with serve_in_thread(PROTECTED) as e:
        yield e


def test_the_enumeration_sees_every_route_and_the_fast_path() -> None:
    routes = _every_route(create_app())
    assert ("POST", "/v1/reports") in routes and ("GET", "/metrics") in routes and ("HEAD", "/healthz") in routes
    assert len({p for _, p in routes}) >= 9


def test_every_route_of_the_served_app_needs_the_token(protected: Embedded) -> None:
    routes = _every_route(protected.app)
    with httpx.Client(base_url=protected.url, timeout=10) as client:
        for method, path in routes:
            body = _batch() if method == "POST" else b""
            without = client.request(method, path, content=body)
            wrong = client.request(method, path, content=body, headers={"Authorization": "Bearer nope"})
            with_token = client.request(method, path, content=body, headers={"Authorization": f"Bearer {TOKEN}"})
            if path in ALWAYS_OPEN:
                assert without.status_code != 401, (method, path)
                continue
            assert (without.status_code, wrong.status_code) == (401, 401), (method, path)
            assert without.headers["www-authenticate"].startswith("Bearer"), (method, path)
            assert with_token.status_code != 401, (method, path)
    assert protected.hd.store.jobs["gate"].ranks[0].steps_total == 1  # only the request with the token got in


def test_every_route_of_the_asgi_door_needs_the_token() -> None:
    app = create_app(PROTECTED)

    async def statuses() -> list[tuple[str, str, int, int]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
            out = []
            for method, path in _every_route(app):
                body = _batch() if method == "POST" else b""
                without = await client.request(method, path, content=body)
                with_token = await client.request(method, path, content=body,
                                                  headers={"Authorization": f"Bearer {TOKEN}"})
                out.append((method, path, without.status_code, with_token.status_code))
            return out

    for method, path, without, with_token in asyncio.run(statuses()):
        assert (without == 401) == (path not in ALWAYS_OPEN), (method, path)
        assert with_token != 401, (method, path)


def test_by_default_only_metrics_healthz_and_openapi_are_open() -> None:
    with serve_in_thread(Settings.from_mapping({"auth": {"token": TOKEN}})) as e:
        with httpx.Client(base_url=e.url, timeout=10) as client:
            open_paths = {path for method, path in _every_route(e.app)
                          if client.request(method, path).status_code != 401}
    assert open_paths == {"/metrics", "/healthz", "/openapi.json"}


def test_an_app_built_around_a_healthd_takes_its_auth_from_it() -> None:
    from healthd.server.pipeline import build

    hd = build(PROTECTED)
    app = create_app(hd=hd)
    assert app.gate.protected
    with pytest.raises(ValueError, match="settings from hd"):
        create_app(Settings(), hd=hd)


def test_a_body_over_the_limit_is_413_at_every_route_before_the_route_runs() -> None:
    settings = Settings.from_mapping({"limits": {"max_body_bytes": 1024}})
    with serve_in_thread(settings) as e:
        with httpx.Client(base_url=e.url, timeout=10) as client:
            for method, path in _every_route(e.app):
                r = client.request(method, path, content=b"x" * 1025)
                assert r.status_code == 413, (method, path)
                assert method == "HEAD" or "limits.max_body_bytes" in r.text, (method, path)
