import subprocess
import sys

FORBIDDEN = ("torch", "starlette", "uvicorn", "prometheus_client")


def test_import_does_not_pull_torch_or_server_dependencies():
    code = (
        "import sys, healthd_client; "
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == ""


def test_transport_imports_without_torch():
    code = (
        "import sys, healthd_client.transport, healthd_client.config, healthd_client.identity; "
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == ""
