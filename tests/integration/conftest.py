"""Fixtures for integration tests: real Alertmanager, real healthd, real Prometheus (see servers.py).

``stack`` wires them as a user would: healthd pushes to Alertmanager, and
Prometheus scrapes healthd every second, loads the rule files in
``deploy/prometheus/`` and sends its alerts to the same Alertmanager.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from healthd.settings import Settings
from tests.integration.servers import Alertmanager, Prometheus, alertmanager, prometheus
from tests.live import LiveHealthd, live_healthd

REPO = Path(__file__).resolve().parents[2]
RULE_DIR = REPO / "deploy" / "prometheus"


def deploy_rule_files() -> list[Path]:
    """The Prometheus rule files shipped in deploy/prometheus/ (alerting and recording rules)."""
    return sorted(RULE_DIR.glob("*.rules.yml"))


@dataclass
class Stack:
    alertmanager: Alertmanager
    healthd: LiveHealthd
    prometheus: Prometheus


def stack_settings(alertmanager_url: str, **update: object) -> Settings:
    """healthd settings for a stack: Alertmanager push on, alerts re-sent quickly."""
    data: dict[str, object] = {"alertmanager": {"url": alertmanager_url, "resend_seconds": 2.0}}
    data.update(update)
    return Settings.from_mapping(data)


@pytest.fixture
def alertmanager_server() -> Iterator[Alertmanager]:
    with alertmanager() as am:
        yield am


@pytest.fixture
def stack(alertmanager_server: Alertmanager) -> Iterator[Stack]:
    settings = stack_settings(alertmanager_server.url)
    with live_healthd(settings) as hd, prometheus([hd.url], rule_files=deploy_rule_files(),
                                                  alertmanager_url=alertmanager_server.url) as prom:
        yield Stack(alertmanager_server, hd, prom)
