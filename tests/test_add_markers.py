"""`sft-toolkit add-markers`: inference templates in, verified training templates out.

The dev set is every original (non-`_training`) template TRL installs. For each one add-markers converts:
the result renders exactly like the original and passes lint; where TRL ships its own training variant,
our mask equals TRL's token for token except where TRL trains text lint calls wrong (a role header's
newline, text after the end-of-turn, the part of the header the generation prompt writes). Our own
hand-marked bundled templates, stripped of their markers, come back with the same mask. Templates that
can't be converted fail with a line number and write nothing.
"""

from __future__ import annotations

import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import trl

from sft_toolkit.lint import _check_probe, lint
from sft_toolkit.markers import MarkerError, add_markers, strip_markers
from sft_toolkit.masks import TemplateRaised, render, tokenize
from sft_toolkit.probes import PROBES, WEATHER_TOOL, Probe, generated_conversations
from sft_toolkit.problems import InputError
from sft_toolkit.turns import end_of_turn, locate_turns, usable_probe

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
DEV_SET = sorted(p.stem for p in TRL_TEMPLATES.glob("*.jinja") if not p.stem.endswith("_training"))
BUNDLED = sorted(p for p in (Path(__file__).resolve().parents[1] / "templates").glob("*.jinja"))

# Every dev-set template converts and verifies today except these (docs/add-markers.md gives the cause).
# A template joining this set is a regression; one leaving it should be taken out.
REFUSED: set[str] = set()
CONVERTS = set(DEV_SET) - REFUSED


@cache
def converted(name: str):
    source = (TRL_TEMPLATES / f"{name}.jinja").read_text()
    try:
        return add_markers(source)
    except MarkerError as err:
        return err


def cases(source: str):
    """Every render the checks compare: whole probes with and without the generation prompt, and each
    prefix that ends right before an assistant turn, with it."""
    for probe in PROBES:
        probe = usable_probe(source, probe, {})
        yield probe, probe.messages, False
        yield probe, probe.messages, True
        for i, m in enumerate(probe.messages):
            if m.get("role") == "assistant" and i:
                yield probe, probe.messages[:i], True


def rendered(source, probe, messages, prompt):
    try:
        return render(source, messages, add_generation_prompt=prompt, tools=probe.tools).text
    except (TemplateRaised, InputError) as err:
        return f"<failed: {err}>"


@pytest.mark.parametrize("name", DEV_SET)
def test_dev_set_template_converts_or_says_where_it_cannot(name):
    result = converted(name)
    if name in CONVERTS:
        assert not isinstance(result, MarkerError), f"{name} no longer converts: {result}"
    elif isinstance(result, MarkerError):
        assert str(result).strip()  # a cause, and where the template allows it a line
    else:
        pytest.fail(f"{name} now converts: take it out of REFUSED and the table in docs/add-markers.md")


@pytest.mark.parametrize("name", sorted(CONVERTS))
def test_converted_template_renders_like_the_original_and_passes_lint(name):
    original = (TRL_TEMPLATES / f"{name}.jinja").read_text()
    marked = converted(name).source
    for probe, messages, prompt in cases(original):
        assert rendered(marked, probe, messages, prompt) == rendered(original, probe, messages, prompt), (
            f"{name}: {probe.name} ({len(messages)} messages, add_generation_prompt={prompt})"
        )
    result = lint(marked, name, reference=original)
    assert result.ok, [f.message for f in result.findings if f.severity == "error"]


PAIRS = sorted(n for n in CONVERTS if (TRL_TEMPLATES / f"{n}_training.jinja").exists())


@pytest.mark.parametrize("name", PAIRS)
def test_mask_equals_trl_training_template_except_what_lint_forbids(name, qwen_tokenizer, llama3_tokenizer):
    """Token for token wherever TRL's training variant renders the same text. Where the masks
    differ, TRL trains the token and we don't, and the token is whitespace or lies outside the assistant
    turn (lint's R002: header text the generation prompt writes, text after the end-of-turn)."""
    original = (TRL_TEMPLATES / f"{name}.jinja").read_text()
    ours, theirs = converted(name).source, (TRL_TEMPLATES / f"{name}_training.jinja").read_text()
    tokenizer = llama3_tokenizer if name == "llama3" else qwen_tokenizer  # llama 3.0 needs a bos_token
    compared = 0
    for probe in PROBES:
        probe = usable_probe(original, probe, {})
        try:
            a = tokenize(tokenizer, probe.messages, template=ours, tools=probe.tools)
            b = tokenize(tokenizer, probe.messages, template=theirs, tools=probe.tools)
        except (TemplateRaised, InputError):
            continue
        # TRL's variant may render other text from some point on (qwen3's <think> on every turn, glm4's role
        # tag after the last turn): compare the tokens before it, as long as both tokenize them alike.
        same = 0
        while (
            same < min(len(a.ids), len(b.ids))
            and a.ids[same] == b.ids[same]
            and a.offsets[same] == b.offsets[same]
            and a.text[: a.offsets[same][1]] == b.text[: b.offsets[same][1]]
        ):
            same += 1
        if not any(a.mask[:same]) and not any(b.mask[:same]):
            continue  # no assistant turn before the texts part
        compared += 1
        full = render(original, probe.messages, tools=probe.tools)
        eot = end_of_turn(original, probe, {})
        turns, _ = locate_turns(original, probe, full, eot, {})
        inside = [False] * len(a.text)
        for turn in turns:
            end = len(a.text[: turn.region[1]].rstrip())
            inside[turn.region[0] : end] = [True] * (end - turn.region[0])
        for i, (x, y) in enumerate(zip(a.mask[:same], b.mask[:same])):
            if x == y:
                continue
            start, stop = a.offsets[i]
            token = a.text[start:stop]
            assert y == 1 and x == 0, f"{name}/{probe.name}: we train {token!r}, TRL doesn't"
            assert token.isspace() or not any(inside[start:stop]), (
                f"{name}/{probe.name}: TRL trains assistant output {token!r} that we leave out"
            )
    assert compared, f"{name}: TRL's training variant never renders the original's text"


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_bundled_templates_stripped_of_markers_come_back_with_the_same_mask(path):
    source = path.read_text()
    bare = strip_markers(source)
    marked = add_markers(bare).source
    for probe in PROBES:
        probe = usable_probe(source, probe, {})
        try:
            hand = render(source, probe.messages, tools=probe.tools)
        except (TemplateRaised, InputError):
            continue
        auto = render(marked, probe.messages, tools=probe.tools)
        assert auto.text == hand.text
        assert auto.trained_chars() == hand.trained_chars(), f"{path.stem}/{probe.name}"


def trained_turns(source: str, messages: list[dict]) -> list[str]:
    out = render(source, messages)
    return [out.text[a:b] for a, b in out.spans]


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]


def test_plain_text_template_gets_role_conditioned_markers():
    """Text between tags, one line for every role: the assistant's copy is marked, content plus end-of-turn."""
    source = (
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    marked = add_markers(source).source
    assert "".join(trained_turns(marked, CONVERSATION)) == "Hello!<|end|>See you.<|end|>"
    assert render(marked, CONVERSATION).text == render(source, CONVERSATION).text


def test_whitespace_control_survives_markers():
    """`{{-`/`-}}`, indentation and newlines around the tags render as before."""
    source = (
        "{%- for message in messages %}\n"
        "    {%- if message.role == 'assistant' %}\n"
        "        {{- '<start>model\\n' + message.content + '<stop>\\n' }}\n"
        "    {%- else %}\n"
        "        {{- '<start>' + message.role + '\\n' + message.content + '<stop>\\n' }}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}{{- '<start>model\\n' }}{%- endif %}\n"
    )
    marked = add_markers(source).source
    assert render(marked, CONVERSATION).text == render(source, CONVERSATION).text
    assert trained_turns(marked, CONVERSATION) == ["Hello!<stop>", "See you.<stop>"]


def test_turn_assembled_in_a_variable_is_split_after_its_role_header():
    """Llama 3.0 builds each turn in `set content = header + text + eot` and prints it whole: the print is
    split where the role header ends, found in the printed text itself."""
    source = (
        "{% for m in messages %}{% set text = '<' + m.role + '>\n' + m.content + '</s>' %}\n"
        "{{ text }}{% endfor %}{% if add_generation_prompt %}<assistant>\n{% endif %}"
    )
    marked = add_markers(source).source
    assert "text.find('<assistant>\\n') + 12" in marked
    assert render(marked, CONVERSATION).text == render(source, CONVERSATION).text
    assert trained_turns(marked, CONVERSATION) == ["Hello!</s>", "See you.</s>"]


UNSPLITTABLE = (
    "{% for m in messages %}{% set text = '<' + m.role + '>' + m.content + '</s>\\n[' + m.role + ']' %}\n"
    "{{ text }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_variable_with_untrained_text_after_the_turn_is_refused_with_its_line():
    with pytest.raises(MarkerError) as err:
        add_markers(UNSPLITTABLE)
    assert err.value.line == 2


def test_already_marked_template_is_returned_unchanged():
    source = BUNDLED[0].read_text()
    result = add_markers(source)
    assert result.source == source and result.blocks == 0


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "sft_toolkit", "add-markers", *args], capture_output=True, text=True, cwd=cwd
    )


def test_cli_writes_a_template_that_lint_accepts_or_writes_nothing(tmp_path):
    out = tmp_path / "qwen2_5_training.jinja"
    done = cli(str(TRL_TEMPLATES / "qwen2_5.jinja"), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout
    assert lint(out.read_text(), "out", reference=(TRL_TEMPLATES / "qwen2_5.jinja").read_text()).ok

    source, refused = tmp_path / "unsplittable.jinja", tmp_path / "unsplittable_training.jinja"
    source.write_text(UNSPLITTABLE)
    done = cli(str(source), "-o", str(refused), "--format", "json")
    assert done.returncode == 1
    assert not refused.exists()
    import json

    report = json.loads(done.stdout)
    assert report["ok"] is False and report["error"]["line"] == 2

    missing = cli(str(tmp_path / "nope.jinja"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_cli_names_the_named_templates_it_does_not_convert(tmp_path, capsys):
    import json

    from sft_toolkit.cli import main

    folder = tmp_path / "tok"
    (folder / "additional_chat_templates").mkdir(parents=True)
    (folder / "chat_template.jinja").write_text((TRL_TEMPLATES / "qwen2_5.jinja").read_text())
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text((TRL_TEMPLATES / "qwen2_5.jinja").read_text())
    assert main(["add-markers", str(folder), "-o", str(tmp_path / "out.jinja")]) == 0
    note = capsys.readouterr().err
    assert "tool_use.jinja" in note and "does not convert" in note
    assert main(["add-markers", str(folder), "-o", str(tmp_path / "out2.jinja"), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["other_templates"] == [str(folder / "additional_chat_templates" / "tool_use.jinja")]
    assert main(["add-markers", str(folder / "chat_template.jinja"), "--format", "json"]) == 0
    assert "other_templates" not in json.loads(capsys.readouterr().out)  # one file: nothing else to name


# A turn made of several messages, each with its own header (gpt-oss's harmony format): the generation prompt
# writes the first header, the model writes the others from the same code.
HARMONY_LIKE = (
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- if m.reasoning_content %}{{ '<|start|>assistant<|channel|>analysis<|message|>' + m.reasoning_content + '<|end|>' }}"
    "{%- endif %}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + m.content + '<|return|>' }}"
    "{%- else %}{{ '<|start|>' + m.role + '<|message|>' + m.content + '<|end|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start|>assistant' }}{%- endif %}"
)


def test_headers_the_model_writes_inside_its_turn_are_trained_and_the_prompts_is_not():
    marked = add_markers(HARMONY_LIKE).source
    reasoning = [
        {"role": "user", "content": "Is 91 prime?"},
        {"role": "assistant", "reasoning_content": "91 = 7 * 13.", "content": "No."},
    ]
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    for messages in (reasoning, plain, CONVERSATION):
        assert render(marked, messages).text == render(HARMONY_LIKE, messages).text
    assert trained_turns(marked, reasoning) == [
        "<|channel|>analysis<|message|>91 = 7 * 13.<|end|>",
        "<|start|>assistant<|channel|>final<|message|>No.<|return|>",
    ]
    assert trained_turns(marked, plain) == ["<|channel|>final<|message|>Hello.<|return|>"]
    assert lint(marked, "harmony").ok


HELD_OUT = generated_conversations(12)


@pytest.mark.parametrize("name", sorted(CONVERTS))
def test_converted_template_is_right_on_conversations_the_probes_do_not_contain(name):
    """Verification runs on the probe corpus; this checks the result on other conversations with the same
    rules (every assistant turn and its end-of-turn trained, nothing else), as a user's data would."""
    original, marked = (TRL_TEMPLATES / f"{name}.jinja").read_text(), converted(name).source
    eot = next((e for p in PROBES if (e := end_of_turn(original, usable_probe(original, p, {}), {}))), None)
    checked = 0
    for messages in HELD_OUT:
        probe = usable_probe(original, Probe("held-out", messages, [WEATHER_TOOL]), {})
        try:
            expected = render(original, probe.messages, tools=probe.tools)
        except (TemplateRaised, InputError):
            continue  # the original refuses this conversation (e.g. no tool role)
        ours = render(marked, probe.messages, tools=probe.tools)
        assert ours.text == expected.text
        problems = [
            f"{rule} {message} {example or ''}"
            for rule, severity, message, _, example in _check_probe(original, probe, ours, eot, {})
            if severity == "error" and rule != "R004"
        ]
        assert not problems, (messages, problems)
        checked += 1
    assert checked >= 3, f"{name} rendered only {checked} of {len(HELD_OUT)} conversations"


def test_glm4_without_an_end_of_turn_converts_with_its_r003_allowance_and_reason():
    """glm4 writes nothing after an assistant's content (the next role tag ends the turn): lint's R003 is an
    error for that, so the conversion writes the allowance, with the reason, and lint shows it as info."""
    marked = converted("glm4moe").source
    assert "sft-toolkit: allow R003 (inherited from the original template: it writes nothing after" in marked
    findings = [f for f in lint(marked, "glm4moe").findings if f.rule == "R003"]
    assert findings and all(
        f.severity == "info" and "next message's role tag ends the turn" in f.message for f in findings
    )
