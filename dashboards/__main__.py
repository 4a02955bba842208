"""``python -m healthd_dashboards [DIR]``: write the dashboards' JSON (default: dashboards/json)."""

import sys

from healthd_dashboards.build import export

for path in export(sys.argv[1] if len(sys.argv) > 1 else "dashboards/json"):
    print(path)
