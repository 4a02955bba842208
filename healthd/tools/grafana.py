"""Push dashboards to Grafana over its HTTP API with httpx (``healthd dashboards push``).

Upsert by uid into a folder: the folder is created when missing
(``GET``/``POST /api/folders``), each dashboard is posted to
``POST /api/dashboards/db`` with ``overwrite: true``, so pushing twice leaves one
copy. Authentication is a service-account token (``Authorization: Bearer``).

Why not a client library: ``grafana-api`` has been unmaintained since 2020 and
its fork ``grafana-client`` installs ``urllib3-future``, whose ``.pth`` file
replaces ``urllib3`` in the whole environment at every interpreter start. Three
endpoints do not justify that; httpx is already a dependency.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx


class GrafanaError(RuntimeError):
    """Grafana refused a request; the message carries its status and body."""


@dataclass(frozen=True)
class Pushed:
    uid: str
    url: str
    version: int | None


def _check(r: httpx.Response, what: str) -> dict[str, Any]:
    if r.status_code >= 400:
        raise GrafanaError(f"{what}: HTTP {r.status_code}: {r.text[:500]}")
    body: dict[str, Any] = r.json() if r.content else {}
    return body


def push_dashboards(grafana_url: str, token: str | None, dashboards: Mapping[str, Mapping[str, Any]], *,
                    folder_uid: str = "healthd", folder_title: str = "healthd", timeout_seconds: float = 10.0,
                    transport: httpx.BaseTransport | None = None) -> list[Pushed]:
    """Create the folder if needed and upsert each dashboard (uid -> JSON model) into it."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=grafana_url.rstrip("/"), headers=headers, timeout=timeout_seconds,
                      transport=transport) as client:
        r = client.get(f"/api/folders/{folder_uid}")
        if r.status_code == 404:
            _check(client.post("/api/folders", json={"uid": folder_uid, "title": folder_title}),
                   f"create folder {folder_uid!r}")
        else:
            _check(r, f"get folder {folder_uid!r}")
        out = []
        for uid, model in dashboards.items():
            body = {"dashboard": {**model, "id": None, "uid": uid}, "folderUid": folder_uid, "overwrite": True,
                    "message": "healthd dashboards push"}
            res = _check(client.post("/api/dashboards/db", json=body), f"push dashboard {uid!r}")
            out.append(Pushed(uid=uid, url=str(res.get("url", "")), version=res.get("version")))
        return out
