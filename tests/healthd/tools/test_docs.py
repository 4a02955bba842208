"""docs/rules.md, docs/metrics.md, docs/configuration.md: generated from the code and committed up to date."""

from __future__ import annotations

from pathlib import Path

import pytest

from healthd.exposition import catalog as C
from healthd.rules import ALL_RULES, RuleConfig
from healthd.settings import Settings
from healthd.tools.cli import main
from healthd.tools.docs import configuration_md, doc_files, metrics_md, rules_md

REPO = Path(__file__).resolve().parents[3]
DOCS = REPO / "docs"


@pytest.mark.parametrize("rel", sorted(doc_files()))
def test_committed_generated_docs_are_up_to_date(rel: str) -> None:
    path = DOCS / rel
    assert path.is_file(), f"docs/{rel} is missing: run `healthd docs export`"
    assert path.read_text(encoding="utf-8") == doc_files()[rel], f"docs/{rel} is stale: run `healthd docs export`"


def test_generation_is_deterministic() -> None:
    assert doc_files() == doc_files()


def test_every_rule_is_documented_with_its_config_and_advice() -> None:
    text = rules_md()
    for rule in ALL_RULES:
        assert f"\n## {rule.name}\n" in text
        section = text.split(f"\n## {rule.name}\n")[1].split("\n## ")[0]
        assert " ".join(rule.advice.split()) in section
        common = RuleConfig.model_fields
        for name, field in rule.Config.model_fields.items():
            if name not in common or field.default != common[name].default:  # its own, or a changed default
                assert f"| `{name}` |" in section, (rule.name, name)


def test_every_metric_is_documented() -> None:
    text = metrics_md()
    for m in C.ALL:
        assert f"| `{m.name}` | {m.type.value} |" in text


def test_every_setting_is_documented() -> None:
    text = configuration_md()
    for name, field in Settings.model_fields.items():
        assert f"\n## {name}\n" in text or f"| `{name}` |" in text, name
        sub = field.annotation
        for sub_name in getattr(sub, "model_fields", {}):
            assert f"| `{sub_name}` |" in text, (name, sub_name)


def test_a_pipe_in_a_description_does_not_break_the_table() -> None:
    row = next(line for line in configuration_md().splitlines() if line.startswith("| `noise_scale_ema_alpha`"))
    assert row.count(" | ") == 4  # five cells: |G|^2 in the description is escaped


def test_cli_check_names_stale_files_and_export_fixes_them(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["docs", "export", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert all(f"{tmp_path / rel} is stale: run `healthd docs export`" in err for rel in doc_files())
    assert main(["docs", "export", str(tmp_path)]) == 0
    assert main(["docs", "export", str(tmp_path), "--check"]) == 0
    (tmp_path / "metrics.md").write_text("edited by hand\n")
    assert main(["docs", "export", str(tmp_path), "--check"]) == 1
    assert "metrics.md is stale" in capsys.readouterr().err
