"""The lint rule registry is the one definition of the rules: the tables the docs show are rendered from it,
every code the sources name is in it, and no finding picks its own code and severity outside it.

`python tests/test_rules.py` rewrites the tables in docs/lint.md (and the README's, where it has one) from
`sft_toolkit.rules.RULES`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from sft_toolkit.rules import RULES, TABLE_HEADER, rules_table

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sft_toolkit"
LINT_DOC = ROOT / "docs" / "lint.md"
README = ROOT / "README.md"
CODE = re.compile(r"\b[A-Z][0-9]{3}\b")


def table_in(text: str) -> str | None:
    """The rule table in a markdown text: its header line and the table lines that follow, or None."""
    lines = text.splitlines()
    first = TABLE_HEADER.splitlines()[0]
    if first not in lines:
        return None
    start = lines.index(first)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[start:end])


def documents_with_a_table() -> list[Path]:
    return [path for path in (LINT_DOC, README) if table_in(path.read_text(encoding="utf-8")) is not None]


def test_docs_lint_has_the_rule_table():
    assert LINT_DOC in documents_with_a_table()


def test_every_rule_table_is_the_one_rendered_from_the_registry():
    for path in documents_with_a_table():
        assert table_in(path.read_text(encoding="utf-8")) == rules_table(), (
            f"{path.name}'s rule table differs from the registry; run `python tests/test_rules.py`"
        )


def test_the_table_has_one_row_per_rule_with_its_severities():
    rows = rules_table().splitlines()[2:]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == list(RULES)
    assert "| S004 | static | error / warning |" in rules_table()


def _string_constants(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node


def test_every_code_the_sources_and_templates_name_is_registered():
    named = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in _string_constants(path):
            for code in CODE.findall(node.value):
                named.setdefault(code, f"{path.relative_to(ROOT)}:{node.lineno}")
    for path in sorted((ROOT / "templates").glob("*.jinja")):
        for code in re.findall(r"sft-toolkit:\s*allow\s+([A-Z][0-9]{3})", path.read_text(encoding="utf-8")):
            named.setdefault(code, str(path.relative_to(ROOT)))
    assert set(named) >= {"S001", "R003"}  # the scan sees the codes lint raises
    assert {code: where for code, where in named.items() if code not in RULES} == {}


def test_no_finding_is_built_with_a_literal_code_outside_the_registry():
    """A finding's severity comes from its rule: `RULES[code].finding(...)`, never `Finding("S001", ERROR, ...)`."""
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Finding"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                offences.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offences == []


def test_a_rule_finding_carries_the_registered_severity():
    rule = RULES["S004"]
    assert rule.finding("m", 3).severity == rule.severity
    assert rule.finding("m", 3, conditional=True).severity == rule.conditional_severity != rule.severity
    assert RULES["S001"].conditional_severity is None


def write_tables() -> None:
    for path in documents_with_a_table():
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace(table_in(text), rules_table()), encoding="utf-8")
        print(f"wrote the rule table in {path.relative_to(ROOT)}")


if __name__ == "__main__":
    write_tables()
