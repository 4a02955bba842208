"""deploy/: validated as far as this machine allows (no Docker daemon/compose plugin, no Kubernetes cluster).

Run here: amtool check-config and routing tests, promtool check config, YAML structure of the
compose file and the Kubernetes manifests, paths they reference, generated ConfigMap up to date.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from healthd_dashboards.build import configmap, dashboards
from tests.integration.servers import require_binary

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60,
                          cwd=REPO)


def test_alertmanager_config_and_routing_tree() -> None:
    cfg = str(DEPLOY / "alertmanager" / "alertmanager.yml")
    r = _run("amtool", "check-config", cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    for labels, receiver in ((["severity=critical", "alertname=NonFiniteValues"], "pager"),
                             (["severity=warning", "alertname=ExplodingGradients"], "chat"),
                             (["severity=info", "alertname=LossPlateau"], "null")):
        r = _run("amtool", "config", "routes", "test", f"--config.file={cfg}", *labels)
        assert r.returncode == 0 and r.stdout.strip() == receiver, (labels, r.stdout, r.stderr)


def test_prometheus_scrape_config(tmp_path: Path) -> None:
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    cfg = yaml.safe_load(text)
    scrape = cfg["scrape_configs"][0]
    assert scrape["job_name"] == "healthd" and scrape["honor_labels"] is True
    local = tmp_path / "prometheus.yml"
    local.write_text(text.replace("/etc/prometheus/", f"{DEPLOY / 'prometheus'}/"))
    r = _run("promtool", "check", "config", str(local))
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_stack_references_existing_files() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    shards = {"healthd-1", "healthd-2", "healthd-3"}
    peers = {"alertmanager-1": "alertmanager-2", "alertmanager-2": "alertmanager-1"}
    assert set(services) == {"healthd", *shards, "prometheus", *peers, "grafana"}
    assert services["healthd"]["image"].startswith("haproxy:")  # the proxy, on healthd's address
    for shard in shards:
        command = services[shard]["command"]
        pushed_to = [command[i + 1] for i, arg in enumerate(command) if arg == "--alertmanager-url"]
        assert pushed_to == [f"http://{peer}:9093" for peer in sorted(peers)]  # every alert to both peers
        assert command[command.index("--route-url") + 1] == "http://healthd:9184"  # the proxy (failback)
        assert (REPO / services[shard]["build"]["dockerfile"]).is_file()
        assert services["healthd"]["environment"][f"HEALTHD_SHARD{shard[-1]}"] == f"{shard}:9184"
    targets = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())[
        "scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == sorted(f"{shard}:9184" for shard in shards)  # each shard, not the proxy
    for peer, other in peers.items():  # peered with each other, gossiping on the cluster port
        assert "--cluster.listen-address=0.0.0.0:9094" in services[peer]["command"]
        assert f"--cluster.peer={other}:9094" in services[peer]["command"]
    alerting = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["alerting"]
    assert alerting["alertmanagers"][0]["static_configs"][0]["targets"] == [f"{p}:9093" for p in sorted(peers)]
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), src
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src


def test_kubernetes_manifests() -> None:
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service", "ServiceMonitor", "PrometheusRule", "ConfigMap"}
    sm = kinds["ServiceMonitor"]["spec"]
    assert sm["endpoints"][0]["honorLabels"] is True
    assert sm["selector"]["matchLabels"] == kinds["Service"]["spec"]["selector"]
    port_names = {p["name"] for p in kinds["Service"]["spec"]["ports"]}
    assert sm["endpoints"][0]["port"] in port_names
    cm = kinds["ConfigMap"]
    assert cm["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert sorted(cm["data"]) == sorted(f"{uid}.json" for uid in dashboards())


def test_dashboards_configmap_is_up_to_date() -> None:
    assert (DEPLOY / "k8s" / "grafana-dashboards.yaml").read_text() == configmap(), \
        "deploy/k8s/grafana-dashboards.yaml is stale: run `python -m healthd_dashboards`"


def test_both_kubernetes_variants_push_to_every_alertmanager_replica() -> None:
    """healthd.yaml (one server) and sharded/shards.yaml list the same Alertmanager pods, each one by its
    own DNS name: a push to the Service would reach one replica, and a replica down would lose it."""
    pushed_to = []
    for path in (DEPLOY / "k8s" / "healthd.yaml", DEPLOY / "k8s" / "sharded" / "shards.yaml"):
        workload = next(d for d in yaml.safe_load_all(path.read_text()) if d["kind"] in {"Deployment", "StatefulSet"})
        args = workload["spec"]["template"]["spec"]["containers"][0]["args"]
        pushed_to.append([a.removeprefix("--alertmanager-url=") for a in args if a.startswith("--alertmanager-url=")])
    assert "--route-url=http://healthd.monitoring:9184" in args  # the shards' proxy, the Service `healthd`
    assert pushed_to[0] == pushed_to[1]
    assert pushed_to[0] == [f"http://alertmanager-main-{i}.alertmanager-operated.monitoring:9093" for i in range(3)]
