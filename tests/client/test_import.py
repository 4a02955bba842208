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


def test_the_public_attach_has_the_signature_of_the_one_it_forwards_to() -> None:
    # healthd_client.attach is written out so that importing the package does not import torch;
    # healthd_client.attachment.attach does the work. The two signatures are one contract.
    import inspect

    import healthd_client
    from healthd_client import attachment

    assert inspect.signature(healthd_client.attach) == inspect.signature(attachment.attach)
