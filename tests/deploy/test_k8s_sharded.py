"""deploy/k8s/sharded: the shards' StatefulSet, the HAProxy in front of them, their PodMonitor and PDB.

No cluster here: every manifest is validated against Kubernetes' own OpenAPI schemas (kubernetes-validate,
offline; the PodMonitor is a CRD it does not know and is checked field by field), the pieces are checked
to fit together (selectors, names, ports, the proxy's server list against the StatefulSet), and the
embedded HAProxy config goes through the real ``haproxy -c``, holding every line of deploy/haproxy/haproxy.cfg.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.servers import require_binary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SHARDED = DEPLOY / "k8s" / "sharded"
KUBERNETES_VERSION = "1.30.0"
KNOWN = {("v1", "Service"), ("v1", "ConfigMap"), ("apps/v1", "StatefulSet"), ("apps/v1", "Deployment"),
         ("policy/v1", "PodDisruptionBudget"), ("monitoring.coreos.com/v1", "PodMonitor")}


def _docs() -> list[dict[str, Any]]:
    return [d for f in sorted(SHARDED.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def _one(kind: str, component: str | None = None) -> dict[str, Any]:
    found = [d for d in _docs() if d["kind"] == kind
             and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]
    assert len(found) == 1, (kind, component, len(found))
    return found[0]


def _haproxy_cfg() -> str:
    return str(_one("ConfigMap", "proxy")["data"]["haproxy.cfg"])


def test_every_manifest_parses_and_is_a_known_kind() -> None:
    docs = _docs()
    assert {(d["apiVersion"], d["kind"]) for d in docs} == KNOWN
    for d in docs:
        assert d["metadata"]["name"] and d["metadata"]["labels"]["app.kubernetes.io/name"] == "healthd", d["kind"]


def test_builtin_kinds_validate_against_kubernetes_openapi_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate")  # offline schemas: the test extra installs it
    for d in _docs():
        if d["apiVersion"] != "monitoring.coreos.com/v1":
            kv.validate(d, KUBERNETES_VERSION, strict=True)  # raises on an unknown or missing field


def test_shards_statefulset_headless_service_and_pdb_select_the_same_pods() -> None:
    sts, svc, pdb = _one("StatefulSet"), _one("Service", "shard"), _one("PodDisruptionBudget")
    selector = sts["spec"]["selector"]["matchLabels"]
    assert selector.items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == selector
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["selector"]["matchLabels"] == selector
    container = sts["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    token = next(e for e in container["env"] if e["name"] == "HEALTHD_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "healthd-token", "key": "token"}
    assert not any("token" in a for a in container["args"])  # never on the command line
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


def test_podmonitor_scrapes_each_shard_directly_keeping_the_training_job_label() -> None:
    pm, sts = _one("PodMonitor"), _one("StatefulSet")
    assert pm["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    ports = {p["name"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics" and endpoint["honorLabels"] is True


def test_proxy_servers_are_the_statefulsets_pods_on_a_stable_ring() -> None:
    sts, svc = _one("StatefulSet"), _one("Service", "shard")
    name, replicas = sts["metadata"]["name"], sts["spec"]["replicas"]
    port = svc["spec"]["ports"][0]["port"]
    servers = re.findall(r"^\s*server (\S+) (\S+) id (\d+) (.*)$", _haproxy_cfg(), re.M)
    assert [(s[0], s[1], int(s[2])) for s in servers] == [
        (f"shard{i + 1}", f"{name}-{i}.{svc['metadata']['name']}.monitoring.svc.cluster.local:{port}", i + 1)
        for i in range(replicas)]
    for _, _, _, rest in servers:  # DNS followed at run time; the proxy starts before the shards resolve
        assert "resolvers cluster" in rest and "init-addr last,libc,none" in rest


def test_proxy_deployment_mounts_its_config_and_its_service_selects_only_the_proxy() -> None:
    dep, svc, cm = _one("Deployment"), _one("Service", "proxy"), _one("ConfigMap", "proxy")
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["selector"] == selector != _one("StatefulSet")["spec"]["selector"]["matchLabels"]
    assert svc["metadata"]["name"] == "healthd"  # training jobs' HEALTHD_URL is unchanged by sharding
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= {p["name"] for p in container["ports"]}
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert container["volumeMounts"][0] == {"name": volume["name"], "mountPath": "/usr/local/etc/haproxy",
                                            "readOnly": True}


def test_embedded_haproxy_config_is_the_deployed_one_and_valid(tmp_path: Path) -> None:
    """Every routing line of deploy/haproxy/haproxy.cfg (balance, hash, checks, retries, the job header
    rules) is in the ConfigMap's copy; only the bind address and the server lines differ."""
    embedded = {line.strip() for line in _haproxy_cfg().splitlines()}
    for line in (DEPLOY / "haproxy" / "haproxy.cfg").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "bind ", "server ")):
            assert line in embedded, line
    config = tmp_path / "haproxy.cfg"
    config.write_text(_haproxy_cfg())
    # The cluster's names do not resolve here: `init-addr none` makes that a warning, not an error.
    done = subprocess.run([require_binary("haproxy"), "-c", "-f", str(config)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
