"""The bad-input corpus (tests/bad_inputs/cases.yaml) through the command line, as a user meets it.

Each case: the exit code, a line of output that says what is wrong and where, no traceback, and the same
line in docs/bad_inputs.md. Most cases call `sft_toolkit.cli.main` in this process (an exception that
escaped it would fail the test); the few marked `subprocess: true` run `python -m sft_toolkit` for real.

`python tests/test_bad_inputs.py` runs every case and rewrites docs/bad_inputs.md from what it printed.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CORPUS = Path(__file__).parent / "bad_inputs"
DOC = Path(__file__).parents[1] / "docs" / "bad_inputs.md"
BASE_RECIPE = {
    "model_name_or_path": "tokenizer",
    "chat_template_path": "chatml",
    "assistant_only_loss": True,
    "max_length": 256,
}


def load_cases() -> list[dict]:
    sections = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))
    return [{**case, "section": section} for section, cases in sections.items() for case in cases]


CASES = load_cases()


def make_setup(case: dict, workdir: Path) -> None:
    """The user's files a case starts from (`setup`: path -> text, or -> {symlink: target})."""
    for name, content in (case.get("setup") or {}).items():
        path = workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            if not path.is_symlink():
                path.symlink_to(content["symlink"])
        else:
            path.write_text(content, encoding="utf-8")


def setup_intact(case: dict, workdir: Path) -> list[str]:
    """The setup paths whose content or link changed (the user's files must survive byte for byte)."""
    changed = []
    for name, content in (case.get("setup") or {}).items():
        path = workdir / name
        if isinstance(content, dict):
            ok = path.is_symlink() and str(path.readlink()) == content["symlink"]
        else:
            ok = path.is_file() and not path.is_symlink() and path.read_text(encoding="utf-8") == content
        if not ok:
            changed.append(name)
    return changed


def run_case(case: dict, workdir: Path) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of the case's command, run from `workdir` (a copy of the corpus)."""
    make_setup(case, workdir)
    args = list(case.get("args") or [])
    if "recipe" in case:
        recipe = workdir / f"{case['id']}.yaml"
        recipe.write_text(yaml.safe_dump({**BASE_RECIPE, **case["recipe"]}, sort_keys=False))
        args = [recipe.name, *args]
    argv = [case["command"], *args]
    if case.get("subprocess"):
        proc = subprocess.run(
            [sys.executable, "-m", "sft_toolkit", *argv], cwd=workdir, capture_output=True, text=True, timeout=300
        )
        return proc.returncode, proc.stdout, proc.stderr
    from sft_toolkit import masks
    from sft_toolkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    seconds = masks.RENDER_SECONDS
    masks.RENDER_SECONDS = case.get("render_seconds", seconds)
    try:
        with contextlib.chdir(workdir), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        masks.RENDER_SECONDS = seconds
    return code, out.getvalue(), err.getvalue()


def seen_line(case: dict, stdout: str, stderr: str) -> str | None:
    """The line of output that carries the case's message (stderr for unusable input, else stdout)."""
    text = stderr if case["exit"] == 2 else stdout
    return next((line.strip() for line in text.splitlines() if case["says"] in line), None)


def table_row(case: dict, line: str) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    return f"| `{case['id']}` | {cell(case['tried'])} | `{case['command']}` | {cell(line)} | {case['exit']} |"


def doc_rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            rows[line.split("`")[1]] = line
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("bad_inputs") / "corpus"
    shutil.copytree(CORPUS, target)
    return target


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_gets_a_clear_message_and_its_exit_code(case, workdir):
    code, stdout, stderr = run_case(case, workdir)
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert code == case["exit"], stdout[-2000:] + stderr[-2000:]
    assert not setup_intact(case, workdir), "the user's files changed"
    line = seen_line(case, stdout, stderr)
    assert line is not None, f"{case['says']!r} not in:\n{stdout[-2000:]}\n{stderr[-2000:]}"
    assert doc_rows().get(case["id"]) == table_row(case, line), (
        "docs/bad_inputs.md is stale: python tests/test_bad_inputs.py"
    )


def test_doc_table_lists_exactly_the_corpus():
    assert list(doc_rows()) == [c["id"] for c in CASES]


HEADER = """# Bad inputs: what was tried, what the user sees

Generated by `python tests/test_bad_inputs.py` from the corpus in
[tests/bad_inputs/](../tests/bad_inputs/cases.yaml) (templates, `.jsonl` data, recipes), which the test
suite runs through the command line: every row is checked for its exit code, its message and the absence
of a Python traceback. Exit codes: 0 fine, 1 a check failed, 2 unusable input. Paths are relative to the
corpus folder; rows are counted from 0. The render time limit is 10 s; the corpus lowers it to 1 s.

| input | what was tried | command | what the user sees | exit |
|---|---|---|---|---|
"""


def write_doc() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "corpus"
        shutil.copytree(CORPUS, workdir)
        rows = []
        for case in CASES:
            code, stdout, stderr = run_case(case, workdir)
            line = seen_line(case, stdout, stderr)
            if code != case["exit"] or line is None:
                sys.exit(f"{case['id']}: exit {code}, expected {case['exit']}:\n{stdout[-1500:]}\n{stderr[-1500:]}")
            rows.append(table_row(case, line))
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(HEADER + "\n".join(rows) + "\n", encoding="utf-8")
    print(f"wrote {DOC} ({len(rows)} cases)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    write_doc()
