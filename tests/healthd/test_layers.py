"""The server's packages form layers, and imports only go down them (STYLE.md: data flows one way).

A report's path is wire (decode) -> server.limits (admit) -> state (store) -> engine (schedule,
evaluate) -> alerting; exposition reads state and engine; tools drive the server. Every import in
every module is checked, function-local and ``TYPE_CHECKING`` ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Lowest first. A module may import its own layer and the layers before it, never one after it.
LAYERS = ("settings", "wire", "state", "rules", "engine", "alerting", "exposition", "server", "tools")


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "healthd" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "healthd":  # from healthd import settings
                out += [(node.lineno, f"healthd.{a.name}") for a in node.names]
    return out


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def test_every_server_module_sits_in_a_layer() -> None:
    strays = [str(p.relative_to(ROOT)) for p in (ROOT / "healthd").rglob("*.py")
              if _module_name(p) != "healthd" and _layer(_module_name(p)) is None]
    assert strays == [], f"modules outside the layers {LAYERS}: {strays}"


def test_imports_never_go_up_a_layer() -> None:
    upward = []
    for path in sorted((ROOT / "healthd").rglob("*.py")):
        mine = _layer(_module_name(path))
        if mine is None:
            continue
        for line, target in _imports(path):
            theirs = _layer(target)
            if theirs is not None and LAYERS.index(theirs) > LAYERS.index(mine):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {target} ({theirs})")
    assert upward == [], "imports against the flow:\n" + "\n".join(upward)


def test_the_client_and_the_server_never_import_each_other_below_tools() -> None:
    # tools/ (the demo) runs a training loop with the client: the one place the two meet.
    crossing = []
    for package, other in (("client", "healthd"), ("healthd", "healthd_client")):
        for path in sorted((ROOT / package).rglob("*.py")):
            if _layer(_module_name(path)) == "tools":
                continue
            for line, target in _imports(path):
                if target == other or target.startswith(other + "."):
                    crossing.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert crossing == [], "\n".join(crossing)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    # The checker itself: an import of the server from the store is found, at its line.
    bad = tmp_path / "m.py"
    bad.write_text("import math\n\ndef f():\n    from healthd.server.app import create_app\n")
    assert _imports(bad) == [(1, "math"), (4, "healthd.server.app")]
    assert LAYERS.index(_layer("healthd.server.app") or "") > LAYERS.index("state")
