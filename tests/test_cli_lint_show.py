"""`sft-toolkit lint` and `show` as a user runs them: a subprocess, its exit code and its output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sft_toolkit.cli import COMMANDS, main

FIXTURES = Path(__file__).parent / "fixtures" / "templates"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sft_toolkit", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_lint_json_schema_and_exit_codes():
    proc = cli("lint", str(FIXTURES / "good_chatml.jinja"), str(FIXTURES / "S005_eot_after_block.jinja"),
               "--format", "json")
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    good, bad = data["results"]
    assert good == {"template": str(FIXTURES / "good_chatml.jinja"), "ok": True, "findings": []}
    assert bad["ok"] is False
    for finding in bad["findings"]:
        assert set(finding) >= {"rule", "severity", "message", "line"}
        assert finding["severity"] in ("error", "warning", "info")
    assert {"rule": "S005", "severity": "error"}.items() <= next(f for f in bad["findings"] if f["rule"] == "S005").items()


def test_lint_clean_template_exits_zero():
    proc = cli("lint", str(FIXTURES / "good_chatml.jinja"))
    assert proc.returncode == 0
    assert "ok" in proc.stdout


def test_lint_unreadable_input_exits_two_with_one_line():
    proc = cli("lint", "no/such/template.jinja")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "no/such/template.jinja" in proc.stderr


def test_lint_non_utf8_template_exits_two(tmp_path):
    path = tmp_path / "latin1.jinja"
    path.write_bytes("{{ 'caf\xe9' }}".encode("latin-1"))
    proc = cli("lint", str(path))
    assert proc.returncode == 2 and "UTF-8" in proc.stderr and "Traceback" not in proc.stderr


def test_lint_reads_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": (FIXTURES / "S002_no_markers.jinja").read_text()}))
    proc = cli("lint", str(tmp_path), "--format", "json")
    assert proc.returncode == 1
    assert [f["rule"] for f in json.loads(proc.stdout)["results"][0]["findings"]] == ["S002"]


def test_show_plain_marks_the_trained_span(tmp_path):
    conversation = tmp_path / "c.json"
    conversation.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]))
    html = tmp_path / "mask.html"
    proc = cli("show", str(conversation), "--template", str(FIXTURES / "R002_header_in_mask.jinja"),
               "--format", "plain", "--html", str(html))
    assert proc.returncode == 0, proc.stderr
    # The off-by-one is visible: the header's newline sits inside the trained brackets.
    assert "<|im_start|>assistant⟦↵\nHello!<|im_end|>⟧" in proc.stdout
    page = html.read_text()
    assert page.startswith("<!doctype html>") and "<script" not in page and "Hello!" in page


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)], ids=["sft-toolkit", *COMMANDS])
def test_help_exits_0_and_prints_usage(command, capsys):
    # argparse %-formats every help string: a literal `{% generation %}` once made the top-level help a TypeError.
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sft-toolkit{''.join(' ' + c for c in command)}")
    assert "Traceback" not in out
