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
    return subprocess.run(
        [sys.executable, "-m", "sft_toolkit", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_lint_json_schema_and_exit_codes():
    proc = cli(
        "lint", str(FIXTURES / "good_chatml.jinja"), str(FIXTURES / "S005_eot_after_block.jinja"), "--format", "json"
    )
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    good, bad = data["results"]
    assert good == {"template": str(FIXTURES / "good_chatml.jinja"), "ok": True, "findings": []}
    assert bad["ok"] is False
    for finding in bad["findings"]:
        assert set(finding) >= {"rule", "severity", "message", "line"}
        assert finding["severity"] in ("error", "warning", "info")
    assert {"rule": "S005", "severity": "error"}.items() <= next(
        f for f in bad["findings"] if f["rule"] == "S005"
    ).items()


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
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": (FIXTURES / "S002_no_markers.jinja").read_text()})
    )
    proc = cli("lint", str(tmp_path), "--format", "json")
    assert proc.returncode == 1
    assert [f["rule"] for f in json.loads(proc.stdout)["results"][0]["findings"]] == ["S002"]


GOOD, NO_MARKERS = (FIXTURES / "good_chatml.jinja").read_text(), (FIXTURES / "S002_no_markers.jinja").read_text()


def tokenizer_with_named_templates(folder: Path, as_files: bool) -> Path:
    """The tiny test tokenizer with a marked default template and an unmarked `tool_use` one, saved either way
    transformers saves named templates: files (additional_chat_templates/) or a list in tokenizer_config.json."""
    source = Path(__file__).parent / "bad_inputs" / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if as_files:
        (folder / "chat_template.jinja").write_text(GOOD)
        (folder / "additional_chat_templates").mkdir()
        (folder / "additional_chat_templates" / "tool_use.jinja").write_text(NO_MARKERS)
    else:
        config["chat_template"] = [{"name": "default", "template": GOOD}, {"name": "tool_use", "template": NO_MARKERS}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("as_files", [True, False], ids=["template files", "tokenizer_config list"])
def test_lint_checks_every_named_template_transformers_would_render_with(tmp_path, as_files, capsys):
    from transformers import AutoTokenizer

    from sft_toolkit.templates import load_templates

    folder = tokenizer_with_named_templates(tmp_path / "tok", as_files)
    # the same templates transformers loads: rows with tools render with tool_use, the others with default
    loaded = AutoTokenizer.from_pretrained(folder).chat_template
    ours = {template.name: template.source for template in load_templates(str(folder))}
    assert ours == {"tok" if name == "default" else f"tok:{name}": source for name, source in loaded.items()}
    assert main(["lint", str(folder), "--format", "json"]) == 1  # the default alone is fine; tool_use is not
    default, tool_use = json.loads(capsys.readouterr().out)["results"]
    assert default["ok"] is True
    assert "tool_use" in tool_use["template"] and [f["rule"] for f in tool_use["findings"]] == ["S002"]


def test_named_templates_without_a_default_are_refused_where_one_template_is_needed(tmp_path):
    from sft_toolkit.problems import InputError
    from sft_toolkit.templates import load_template

    config = tmp_path / "tokenizer_config.json"
    config.write_text(
        json.dumps({"chat_template": [{"name": "rag", "template": GOOD}, {"name": "tool_use", "template": GOOD}]})
    )
    with pytest.raises(InputError, match="'rag', 'tool_use'.*none is named 'default'"):
        load_template(str(config))
    # one named template that is not the default: transformers renders a row without tools with none either
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": GOOD}]}))
    with pytest.raises(InputError, match="'tool_use'.*none is named 'default'"):
        load_template(str(config))
    # template files take the config's place (as transformers reads them): a plain config template is not the default
    config.write_text(json.dumps({"chat_template": GOOD}))
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text(GOOD)
    with pytest.raises(InputError, match="all named .'tool_use'.*none is the default chat_template.jinja"):
        load_template(str(tmp_path))


def test_a_named_template_entry_without_its_template_is_exit_2_naming_the_field(tmp_path, capsys):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": [{"name": "default", "template": GOOD}, {"name": "tool_use"}]}))
    assert main(["lint", str(config)]) == 2
    assert "field 'chat_template'" in capsys.readouterr().err


def test_show_renders_each_row_with_the_named_template_training_uses(tmp_path, capsys):
    folder = tokenizer_with_named_templates(tmp_path / "tok", as_files=True)
    asked = {"role": "user", "content": "Weather in Oslo?"}
    tool = {"type": "function", "function": {"name": "weather", "description": "d", "parameters": {"type": "object"}}}
    rows = [
        {"messages": [asked, {"role": "assistant", "content": "Sunny."}]},
        {"messages": [asked, {"role": "assistant", "content": "Sunny."}], "tools": [tool]},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    shown = []
    for row in (0, 1):
        assert main(["show", str(data), "--row", str(row), "--tokenizer", str(folder), "--format", "json"]) == 0
        shown.append(json.loads(capsys.readouterr().out))
    assert shown[0]["template"] == f"{folder} (chat template 'default')"
    assert shown[1]["template"] == f"{folder} (chat template 'tool_use')"
    trained = [sum(token["trained"] for token in view["tokens"]) for view in shown]
    assert trained[0] > 0 and trained[1] == 0  # tool_use has no markers: the tool-calling row trains nothing


def test_show_plain_marks_the_trained_span(tmp_path):
    conversation = tmp_path / "c.json"
    conversation.write_text(
        json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    )
    html = tmp_path / "mask.html"
    proc = cli(
        "show",
        str(conversation),
        "--template",
        str(FIXTURES / "R002_header_in_mask.jinja"),
        "--format",
        "plain",
        "--html",
        str(html),
    )
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


# ChatML whose assistant turns open with an empty think block when the caller switches thinking off.
THINKING_SWITCH = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{%- if m.role == 'assistant' %}{% generation %}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{{ m.content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{%- else %}{{ m.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_show_renders_with_the_rows_chat_template_kwargs_and_matches_check_data(tmp_path, capsys):
    """A row with `enable_thinking: false` (the template writes an empty think block into the trained turn):
    show draws exactly the tokens check-data trains for that row."""
    from sft_toolkit import offline_tokenizers
    from sft_toolkit.check_data import check_data
    from sft_toolkit.cli import main
    from sft_toolkit.recipe import build_recipe

    row = {
        "messages": [{"role": "user", "content": "Is 91 prime?"}, {"role": "assistant", "content": "No, 7 x 13."}],
        "chat_template_kwargs": {"enable_thinking": False},
    }
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(row) + "\n")
    tokenizer = str(offline_tokenizers.cached("qwen2"))
    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING_SWITCH)
    template = str(template)
    _, trained = check_data(
        build_recipe(
            {
                "model_name_or_path": tokenizer,
                "dataset_name": str(data),
                "chat_template_path": template,
                "assistant_only_loss": True,
            }
        )
    )
    labels = trained["labels"][0]
    assert (
        main(["show", str(data), "--row", "0", "--template", template, "--tokenizer", tokenizer, "--format", "json"])
        == 0
    )
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert [t["id"] for t in tokens] == trained["input_ids"][0]
    assert [t["trained"] for t in tokens] == [label != -100 for label in labels]
    assert "<think>" in "".join(t["text"] for t in tokens if t["trained"])  # the switch changed the render


def test_show_template_refusing_the_conversation_exits_two_naming_row_and_message(tmp_path, capsys):
    from sft_toolkit.cli import main

    template = tmp_path / "strict.jinja"
    template.write_text(
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system prompts, "
        "please') }}{% endif %}{{ m.content }}{% endfor %}"
    )
    data = tmp_path / "rows.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}) + "\n"
    )
    assert main(["show", str(data), "--row", "0", "--template", str(template)]) == 2
    err = capsys.readouterr().err
    assert "row 0" in err and "no system prompts, please" in err and "Traceback" not in err


def test_show_reads_a_sharegpt_row_as_check_data_does(tmp_path, capsys):
    """ShareGPT rows ({from, value}) go through the same converter in `show` as in check-data and train:
    `human` becomes the user turn and `gpt` the trained assistant turn."""
    data = tmp_path / "sharegpt.jsonl"
    row = {"conversations": [{"from": "human", "value": "What is 2 + 1?"}, {"from": "gpt", "value": "3."}]}
    data.write_text(json.dumps(row) + "\n")
    assert main(["show", str(data), "--row", "0", "--template", "chatml", "--format", "json"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    text = "".join(token["text"] for token in tokens)
    trained = "".join(token["text"] for token in tokens if token["trained"])
    assert "<|im_start|>user\nWhat is 2 + 1?" in text
    assert trained.startswith("3.<|im_end|>")
