"""``python -m healthd_dashboards [DIR] [CONFIGMAP]``: write the dashboards' JSON and the Kubernetes ConfigMap."""

import sys
from pathlib import Path

from healthd_dashboards.build import configmap, export

for path in export(sys.argv[1] if len(sys.argv) > 1 else "dashboards/json"):
    print(path)
cm = Path(sys.argv[2] if len(sys.argv) > 2 else "deploy/k8s/grafana-dashboards.yaml")
cm.write_text(configmap())
print(cm)
