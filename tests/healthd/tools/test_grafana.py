"""healthd dashboards push against a small fake Grafana HTTP server (Grafana is not installable here)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from healthd.tools.cli import main
from healthd.tools.grafana import GrafanaError, push_dashboards


class FakeGrafana:
    """Folders and dashboards by uid, Bearer auth, and Grafana's answers for the three endpoints used."""

    def __init__(self, token: str = "s3cret") -> None:
        self.token = token
        self.folders: dict[str, str] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                fake.requests.append((self.command, self.path))
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    self._send(401, {"message": "Unauthorized"})
                    return False
                return True

            def do_GET(self) -> None:  # noqa: N802
                if not self._authorized():
                    return
                uid = self.path.removeprefix("/api/folders/")
                if uid in fake.folders:
                    self._send(200, {"uid": uid, "title": fake.folders[uid]})
                else:
                    self._send(404, {"message": "folder not found"})

            def do_POST(self) -> None:  # noqa: N802
                if not self._authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/api/folders":
                    fake.folders[body["uid"]] = body["title"]
                    self._send(200, {"uid": body["uid"], "title": body["title"]})
                elif self.path == "/api/dashboards/db":
                    d = body["dashboard"]
                    if body.get("folderUid") not in fake.folders:
                        self._send(400, {"message": "folder not found"})
                        return
                    prev = fake.dashboards.get(d["uid"])
                    if prev is not None and not body.get("overwrite"):
                        self._send(412, {"status": "name-exists"})
                        return
                    version = (prev["version"] + 1) if prev else 1
                    fake.dashboards[d["uid"]] = {"model": d, "folderUid": body["folderUid"], "version": version}
                    self._send(200, {"uid": d["uid"], "url": f"/d/{d['uid']}/x", "version": version,
                                     "status": "success"})
                else:
                    self._send(404, {"message": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    g = FakeGrafana()
    t = threading.Thread(target=g.server.serve_forever, daemon=True)
    t.start()
    yield g
    g.server.shutdown()
    g.server.server_close()


def test_push_upserts_by_uid_into_a_folder(grafana: FakeGrafana) -> None:
    models = {"a": {"title": "A", "panels": []}, "b": {"title": "B", "panels": []}}
    pushed = push_dashboards(grafana.url, "s3cret", models, folder_uid="ml", folder_title="ML")
    assert [p.uid for p in pushed] == ["a", "b"] and grafana.folders == {"ml": "ML"}
    pushed = push_dashboards(grafana.url, "s3cret", models, folder_uid="ml", folder_title="ML")
    assert [p.version for p in pushed] == [2, 2]  # overwritten in place, not duplicated
    assert sorted(grafana.dashboards) == ["a", "b"] and grafana.dashboards["a"]["folderUid"] == "ml"
    assert ("POST", "/api/folders") in grafana.requests and grafana.requests.count(("POST", "/api/folders")) == 1


def test_push_refused_token_is_an_error(grafana: FakeGrafana) -> None:
    with pytest.raises(GrafanaError, match="401"):
        push_dashboards(grafana.url, "wrong", {"a": {"title": "A"}})


def test_cli_push_sends_the_generated_dashboards(grafana: FakeGrafana, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["dashboards", "push", "--grafana-url", grafana.url, "--token", "s3cret"])
    assert rc == 0
    assert sorted(grafana.dashboards) == ["healthd-job", "healthd-layers", "healthd-ranks"]
    assert grafana.dashboards["healthd-job"]["model"]["title"] == "healthd / Job overview"
    assert "healthd-job" in capsys.readouterr().out
    assert main(["dashboards", "push", "--grafana-url", grafana.url, "--token", "nope"]) == 1
