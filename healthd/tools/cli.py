"""``healthd`` command line: serve, demo, report, and the generators (deploy, docs, dashboards)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pydantic import SecretStr

from healthd.settings import ConfigError, Settings


def _serve(args: argparse.Namespace) -> int:
    from healthd.server.app import create_app
    from healthd.server.gc_policy import ServingGC
    from healthd.server.serving import Listen, run

    try:
        settings = Settings.from_yaml(args.config) if args.config else Settings()
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        settings = settings.model_copy(update=overrides)
        if args.alertmanager_url:  # replaces the file's url and urls: the command line names them all
            first, *more = args.alertmanager_url
            settings = settings.model_copy(update={"alertmanager": settings.alertmanager.model_copy(
                update={"url": first, "urls": tuple(more)})})
        if args.public_url:
            settings = settings.model_copy(update={"public_url": args.public_url})
        if args.route_url:
            settings = settings.model_copy(update={"cluster": settings.cluster.model_copy(
                update={"route_url": args.route_url})})
        settings = _security_overrides(settings, args)
        app = create_app(settings, gc_policy=ServingGC())
    except ConfigError as e:
        print(f"healthd: bad configuration: {e}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(args.log_level.upper())  # healthd's own loggers; granian's follow --log-level too
    # SIGTERM/SIGINT: granian stops accepting and finishes in-flight requests, then the app's
    # lifespan shutdown settles and flushes alert state to SQLite (healthd.server.serving.serve).
    run(app, Listen(host=settings.host, port=settings.port, ssl_keyfile=args.ssl_keyfile,
                    ssl_certfile=args.ssl_certfile, access_log=args.access_log, log_level=args.log_level))
    return 0


def _security_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    """--token / $HEALTHD_TOKEN and --db / $HEALTHD_DB over the config file's values."""
    token = args.token or os.environ.get("HEALTHD_TOKEN")
    if token:
        settings = settings.model_copy(update={"auth": settings.auth.model_copy(
            update={"token": SecretStr(token)})})
    db = args.db or os.environ.get("HEALTHD_DB")
    if db:
        settings = settings.model_copy(update={"persistence": settings.persistence.model_copy(
            update={"sqlite_path": db})})
    return settings


def _demo(args: argparse.Namespace) -> int:
    from healthd.tools.demo import run_demo

    return run_demo(fault=args.fault, steps=args.steps, live=not args.no_live)


def _report(args: argparse.Namespace) -> int:
    from healthd.tools.report import ReportError, write_report

    out = args.out or f"report-{args.job.replace('/', '_')}.html"
    try:
        path = write_report(args.server, args.job, out)
    except ReportError as e:
        print(f"healthd report: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def _deploy_export(args: argparse.Namespace) -> int:
    from healthd.tools.deploy import export

    for path in export(args.dir, healthd_url=args.healthd_url):
        print(path)
    return 0


def _docs_export(args: argparse.Namespace) -> int:
    from healthd.tools.docs import CHECK_HINT, export, stale

    if args.check:
        out_of_date = stale(args.dir)
        for path in out_of_date:
            print(f"{path} is stale: {CHECK_HINT}", file=sys.stderr)
        return 1 if out_of_date else 0
    for path in export(args.dir):
        print(path)
    return 0


def _dashboards_export(args: argparse.Namespace) -> int:
    try:
        from healthd_dashboards import export
    except ImportError as e:
        print(f"healthd dashboards: {e}; pip install 'healthd[dashboards]'", file=sys.stderr)
        return 2
    for path in export(args.dir):
        print(path)
    return 0


def _dashboards_push(args: argparse.Namespace) -> int:
    import os

    from healthd.tools.grafana import GrafanaError, push_dashboards

    try:
        from healthd_dashboards import dashboards
    except ImportError as e:
        print(f"healthd dashboards: {e}; pip install 'healthd[dashboards]'", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("GRAFANA_TOKEN")
    try:
        pushed = push_dashboards(args.grafana_url, token, dashboards(), folder_uid=args.folder_uid,
                                 folder_title=args.folder)
    except (GrafanaError, OSError) as e:
        print(f"healthd dashboards push: {e}", file=sys.stderr)
        return 1
    for p in pushed:
        print(f"{p.uid}: {args.grafana_url.rstrip('/')}{p.url} (version {p.version})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``healthd`` command."""
    parser = argparse.ArgumentParser(prog="healthd", description="Training-health service for deep-learning jobs.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the healthd server")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--config", default=None, help="YAML settings file (rules, limits, ...)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--access-log", action="store_true",
                       help="log every HTTP request (off by default: every rank posts several times a second; "
                            "healthd_ingest_requests_total counts them)")
    serve.add_argument("--alertmanager-url", action="append", default=None,
                       help="push alerts to this Alertmanager (v2 API), e.g. http://alertmanager:9093; repeat it "
                            "for each peer of an Alertmanager cluster (each gets every alert)")
    serve.add_argument("--public-url", default=None, help="healthd's URL as users reach it (links in alerts)")
    serve.add_argument("--route-url", default=None,
                       help="cluster.route_url: the proxy in front of the shards, e.g. http://healthd:9184 (a "
                            "job silent here is looked up through it; one that moved is forgotten without paging)")
    serve.add_argument("--token", default=None,
                       help="require 'Authorization: Bearer TOKEN' (prefer $HEALTHD_TOKEN: argv is visible in ps)")
    serve.add_argument("--db", default=None,
                       help="SQLite file for alert state and history (default $HEALTHD_DB, else in memory)")
    serve.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM), passed to granian")
    serve.add_argument("--ssl-certfile", default=None, help="TLS certificate chain (PEM), passed to granian")
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="healthd plus a small CPU training run with a fault")
    demo.add_argument("--fault", default="lr-too-high")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--no-live", action="store_true", help="no live terminal view (for logs/CI)")
    demo.set_defaults(func=_demo)

    report = sub.add_parser("report", help="write a self-contained HTML report of a job from a running healthd")
    report.add_argument("--job", required=True)
    report.add_argument("--server", default="http://127.0.0.1:9184", help="healthd's base URL")
    report.add_argument("--out", default=None, help="output file (default: report-<job>.html)")
    report.set_defaults(func=_report)

    deploy = sub.add_parser("deploy", help="Prometheus rule files and Alertmanager config generated from the catalogs")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    dexp = deploy_sub.add_parser("export", help="write prometheus/*.rules.yml, k8s/prometheusrule.yaml and "
                                 "alertmanager/alertmanager.yml")
    dexp.add_argument("dir", nargs="?", default="deploy")
    dexp.add_argument("--healthd-url", default="http://healthd:9184", help="healthd's URL for links in alerts")
    dexp.set_defaults(func=_deploy_export)

    docs = sub.add_parser("docs", help="reference pages generated from the code (rules, metrics, configuration)")
    docs_sub = docs.add_subparsers(dest="docs_command", required=True)
    docs_exp = docs_sub.add_parser("export", help="write rules.md, metrics.md and configuration.md into DIR")
    docs_exp.add_argument("dir", nargs="?", default="docs")
    docs_exp.add_argument("--check", action="store_true",
                          help="write nothing; exit 1 naming the files that differ from the code")
    docs_exp.set_defaults(func=_docs_export)

    dash = sub.add_parser("dashboards", help="Grafana dashboards (needs the 'dashboards' extra)")
    dash_sub = dash.add_subparsers(dest="dashboards_command", required=True)
    dash_exp = dash_sub.add_parser("export", help="write the dashboards' JSON into DIR")
    dash_exp.add_argument("dir")
    dash_exp.set_defaults(func=_dashboards_export)
    dash_push = dash_sub.add_parser("push", help="upsert the dashboards by uid into a Grafana folder")
    dash_push.add_argument("--grafana-url", required=True)
    dash_push.add_argument("--token", default=None, help="service-account token (default: $GRAFANA_TOKEN)")
    dash_push.add_argument("--folder", default="healthd", help="folder title")
    dash_push.add_argument("--folder-uid", default="healthd")
    dash_push.set_defaults(func=_dashboards_push)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the demo's view
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
