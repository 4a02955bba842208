"""healthd's Grafana dashboards as code; importable as ``healthd_dashboards`` (needs the ``dashboards`` extra)."""

from healthd_dashboards.build import dashboards, export, expressions, render

__all__ = ["dashboards", "export", "expressions", "render"]
