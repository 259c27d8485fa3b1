"""Hostile chat templates are bounded, and a large honest row is the row's problem, not the template's.

Every render the toolkit runs (lint's probes, add-markers' traced render, check-data's and train's
tokenization through transformers' `apply_chat_template`, show) goes through `masks.BoundedSandbox`: one time
budget, one memory budget, and size checks before any operator, filter or method that could build a huge
string, list or number in one step. A template that breaks a bound, or raises anything, ends in one line that
names the template line, exit 2 (or a lint finding / a named row) and no traceback. The budgets are lowered
here (as tests/test_bad_inputs.py does with `render_seconds`) to keep the tests fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import time
from pathlib import Path

import jinja2.sandbox
import pytest
import yaml

from sft_toolkit import masks, preprocess
from sft_toolkit.cli import main
from sft_toolkit.masks import RenderLimit, render
from sft_toolkit.probes import PROBES
from sft_toolkit.templates import bundled_names, load_template

CORPUS = Path(__file__).parent / "bad_inputs"
BASE_RECIPE = {
    "model_name_or_path": "tokenizer",
    "assistant_only_loss": True,
    "max_length": 256,
    "dataset_name": "data/sharegpt.jsonl",
}
SECONDS = 1.0  # the render time budget in these tests
MEMORY = 128 << 20  # the render memory budget in these tests (bytes)
SLACK_SECONDS = 20.0  # loading the tokenizer and the dataset, on a loaded 2-core machine


@pytest.fixture(autouse=True)
def low_budgets(monkeypatch):
    monkeypatch.setattr(masks, "RENDER_SECONDS", SECONDS)
    monkeypatch.setattr(masks, "RENDER_MEMORY", MEMORY)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("render_bounds") / "corpus"
    shutil.copytree(CORPUS, target)
    (target / "conversation.json").write_text(json.dumps({"messages": PROBES[0].messages}), encoding="utf-8")
    return target


def run_cli(command: str, template: str, workdir: Path, **recipe) -> tuple[int, str, float]:
    """Exit code, stdout + stderr, and seconds of `sft-toolkit COMMAND` on templates/hostile_TEMPLATE.jinja."""
    path = f"templates/hostile_{template}.jinja"
    if command in ("lint", "add-markers"):
        argv = [command, path]
    elif command == "show":
        argv = [command, "conversation.json", "--template", path]
    else:
        (workdir / f"{template}.yaml").write_text(
            yaml.safe_dump({**BASE_RECIPE, "chat_template_path": path, **recipe})
        )
        argv = [command, f"{template}.yaml"]
    out = io.StringIO()
    start = time.monotonic()
    with contextlib.chdir(workdir), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    return code, out.getvalue(), time.monotonic() - start


# template, command, exit code, what the one line says, the template line it names
CASES = [
    *[
        (t, c, 2, says, 2)
        for t, says in [
            ("big_string", "would build a repeated string of 1,000,000,000 characters"),
            ("huge_string", "would build a repeated string of 10,000,000,000 characters"),
            ("huge_range", "passes 1,000,000,000 to `range`"),
            ("list_repetition", "would build a repeated list of 1,000,000,000 items"),
            ("doubling_concat", "would build a string of joined parts (`~`)"),
            ("power_overflow", "would compute a number of about 40,000,000,000 bits"),
            ("format_width", "would build a formatted string of 1,000,000,012 characters"),
            ("many_strings", f"used more than {MEMORY >> 20} MiB of memory"),
        ]
        for c in ("lint", "add-markers", "check-data", "show")
    ],
    ("zero_division", "lint", 1, "R007 template failed to render: ZeroDivisionError: division by zero", 2),
    ("zero_division", "add-markers", 2, "fails to render every probe conversation", 2),
    ("zero_division", "check-data", 1, "row 0: template_error: ZeroDivisionError: division by zero", 2),
    ("zero_division", "show", 2, "ZeroDivisionError: division by zero", 2),
    ("loops_when_traced", "add-markers", 2, f"the chat template ran longer than {SECONDS:g} s", 2),
    ("fails_when_traced", "add-markers", 2, "failed while traced on probe single-turn: IndexError", 2),
    ("recursion_when_traced", "add-markers", 2, "RecursionError: a macro or loop calls itself without end", 2),
    *[
        (t, "train", 2, says, 2)
        for t, says in [
            ("loops_when_traced", f"the chat template ran longer than {SECONDS:g} s"),
            ("fails_when_traced", "failed while traced on probe single-turn: IndexError"),
            ("recursion_when_traced", "RecursionError"),
            ("big_string", "would build a repeated string of 1,000,000,000 characters"),
        ]
    ],
]


@pytest.mark.parametrize("template,command,exit_code,says,line", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_hostile_template_ends_in_one_line_naming_its_template_line(corpus, template, command, exit_code, says, line):
    code, output, seconds = run_cli(
        command, template, corpus, mask_guard="repair", output_dir=str(corpus / "runs" / template)
    )
    assert "Traceback" not in output, output[-3000:]
    assert code == exit_code, output[-3000:]
    shown = [row for row in output.splitlines() if says in row]
    assert shown, output[-3000:]
    assert f"template line {line})" in shown[0]
    if exit_code == 2:
        assert f"hostile_{template}.jinja" in shown[0] or command == "show"  # show names the template's line only
    assert seconds < SECONDS + SLACK_SECONDS


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_growth(command: str, template: str, workdir: Path) -> tuple[int, int]:
    """Exit code, and how far the process's peak resident memory rose above its size when the command started,
    measured in a forked child (a fresh peak: getrusage's ru_maxrss starts again at fork)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            before = _rss()
            code, _, _ = run_cli(command, template, workdir)
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
            os.write(write, json.dumps([code, grown]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = pipe.read()
    os.waitpid(pid, 0)
    code, grown = json.loads(report)
    return code, grown


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
@pytest.mark.parametrize(
    "template,command,bound",
    [
        ("big_string", "lint", 32 << 20),  # refused before a byte of it is allocated (lint reached 4 GB)
        ("huge_string", "add-markers", 32 << 20),
        ("doubling_concat", "lint", 32 << 20),
        ("many_strings", "lint", MEMORY + (64 << 20)),  # each string within the size limit: the memory budget stops it
    ],
)
def test_hostile_template_memory_stays_under_the_stated_limit(corpus, template, command, bound):
    code, grown = _peak_growth(command, template, corpus)
    assert code == 2
    assert grown < bound, f"grew {grown / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------- the sandbox's hooks

ONE_STEP_GIANTS = [
    "{% set s = 'a' * 10**9 %}",
    "{% set s = 10**9 * 'a' %}",
    "{% set l = [0] * 10**9 %}",
    "{% set n = 10 ** (10 ** 10) %}",
    "{% set n = (2 ** 30000) * (2 ** 30000) * (2 ** 30000) %}",
    "{{ 'x' | center(10**9) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ 'x' | batch(10**9, 'y') | list }}",
    "{{ '%1000000000s' % '' }}",
    "{{ '%-*s' % (10**9, '') }}",
    "{{ '{:>1000000000}'.format('x') }}",
    "{{ ('a' * 999999) | replace('', 'bbbbbbbbbbbbbbbbbbbbbbbbbb') }}",
    "{{ ('a' * 999999).replace('a', 'bbbbbbbbbbbbbbbbbbbbbbbbbb') }}",
    "{{ (['a' * 999999] * 100) | join('') }}",
    "{{ ''.join(['a' * 999999] * 100) }}",
    "{{ ['a' * 999999] * 100 }}",
    "{{ (['a' * 999999] * 100) | tojson }}",
    "{{ (['a' * 999999] * 100) | string }}",
    "{{ '%s%s' % ('a' * 999999, 'b' * 999999) }}",
    "{{ ('a\\n' * 400000) | indent('b' * 999) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% for i in range(10**9) %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",  # output, or time
]
CHATML = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"


@pytest.mark.parametrize("expression", ONE_STEP_GIANTS)
def test_sandbox_refuses_a_giant_before_building_it_and_names_the_line(expression):
    start = time.monotonic()
    with pytest.raises(RenderLimit, match=r"template line 2\)|and was stopped") as err:
        render("{#- a harmless first line -#}\n" + expression + CHATML, PROBES[0].messages)
    assert "fix the template" in str(err.value)
    assert time.monotonic() - start < SECONDS + 1


HONEST = [
    "{{ '-' * 80 }}",
    "{{ 3 * 'ab' }}",
    "{{ 2 ** 10 }}",
    "{{ 7 * 6 }}",
    "{{ [1, 2] + [3] }}",
    "{{ 'a' ~ 1 ~ none }}",
    "{{ messages | tojson }}",
    "{{ messages | tojson(indent=2) }}",
    "{{ '%-10s|%5.2f' % ('x', 3.14159) }}",
    "{{ '{:>5}|{}'.format(3, 'y') }}",
    "{{ 'a-b-c' | replace('-', ', ') }}",
    "{{ 'x' | center(9) }}",
    "{{ messages | map(attribute='role') | join(', ') }}",
    "{{ ', '.join(['a', 'b']) }}",
    "{{ messages }}",
    "{{ 'line\\nline' | indent('> ', first=true) }}",
    "{{ range(3) | list }}",
    "{{ 'abc'.ljust(6, '.') }}",
    "{{ ('text ' * 3) | wordwrap(4) }}",
    "{{ [[1], [2]] | sum(start=[]) }}",
    "{{ (1, 2) | string }}",
    "{% set ns = namespace(s='') %}{% for m in messages %}{% set ns.s = ns.s + m.content %}{% endfor %}{{ ns.s }}",
]


@contextlib.contextmanager
def transformers_own_sandbox():
    """transformers' chat-template environment as it ships (unbounded), for comparison."""
    from transformers.utils import chat_template_utils

    chat_template_utils.ImmutableSandboxedEnvironment = jinja2.sandbox.ImmutableSandboxedEnvironment
    chat_template_utils._compile_jinja_template.cache_clear()
    try:
        yield
    finally:
        masks.install()


def _renders(sources: list[str]) -> list:
    from transformers.utils.chat_template_utils import render_jinja_template

    out = []
    for source in sources:
        for probe in PROBES:
            for prompt in (False, True):
                try:
                    out.append(
                        render_jinja_template(
                            conversations=[probe.messages],
                            tools=probe.tools,
                            chat_template=source,
                            return_assistant_tokens_mask="generation" in source,
                            add_generation_prompt=prompt,
                            **{**masks.DEFAULT_SPECIAL_TOKENS, **probe.template_kwargs},
                        )
                    )
                except Exception as err:  # noqa: BLE001 - the same error either way
                    out.append(f"{type(err).__name__}: {err}")
    return out


def test_bounded_sandbox_renders_and_marks_exactly_what_transformers_does():
    """Text and generation spans (hence TRL's assistant masks) of every bundled template on every probe, and
    of honest uses of each checked operator and filter, equal those of transformers' own environment."""
    sources = [load_template(name).source for name in bundled_names()] + [h + CHATML for h in HONEST]
    from transformers.utils.chat_template_utils import _compile_jinja_template

    assert isinstance(_compile_jinja_template(CHATML).environment, masks.BoundedSandbox)
    bounded = _renders(sources)
    with transformers_own_sandbox():
        assert not isinstance(_compile_jinja_template(CHATML).environment, masks.BoundedSandbox)
        theirs = _renders(sources)
    assert bounded == theirs
    assert sum(isinstance(r, str) for r in bounded) < len(bounded) / 4  # they mostly render


def test_transformers_apply_chat_template_is_bounded_too(corpus):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    source = (CORPUS / "templates" / "hostile_big_string.jinja").read_text(encoding="utf-8")
    with pytest.raises(RenderLimit, match=r"template line 2\)"):
        tokenizer.apply_chat_template(PROBES[0].messages, chat_template=source, tokenize=True)


# ------------------------------------------------------------------------------------- rows are not templates


def _write_rows(path: Path, sizes: list[int]) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": ("An answer. " * (size // 11 + 1))[:size]},
            ]
        }
        for i, size in enumerate(sizes)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _check_data(workdir: Path, dataset: str, *extra: str, **recipe) -> tuple[int, str]:
    (workdir / "rows.yaml").write_text(
        yaml.safe_dump({**BASE_RECIPE, "chat_template_path": "chatml", "dataset_name": dataset, **recipe})
    )
    out, err = io.StringIO(), io.StringIO()  # stdout: the report; stderr: progress bars, errors
    with contextlib.chdir(workdir), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check-data", "rows.yaml", *extra])
    assert "Traceback" not in err.getvalue()
    return code, out.getvalue()


def test_a_row_over_the_size_limit_is_a_named_counted_row_not_a_failed_dataset(corpus, monkeypatch):
    monkeypatch.setattr(preprocess, "MAX_ROW_CHARS", 5_000)
    _write_rows(corpus / "one_large.jsonl", [40, 12_000, 60])
    code, output = _check_data(corpus, "one_large.jsonl", "--format", "json")
    report = json.loads(output)
    assert code == 1
    assert report["rows"] == 3
    assert [r["index"] for r in report["zero_mask_rows"]] == [1]
    assert report["zero_mask_rows"][0]["reason"].startswith(f"{preprocess.ROW_TOO_LARGE}: 12,0")
    assert "limit 5,000" in report["zero_mask_rows"][0]["reason"]
    assert report["trainable_tokens"] > 0  # the other rows are tokenized and counted
    code, output = _check_data(corpus, "one_large.jsonl", "--max-zero-rows", "1")
    assert code == 0, output  # allowed like any other row with nothing to train


def test_tokenizing_a_large_row_is_charged_to_the_row_not_the_template_budget(corpus, monkeypatch):
    """The byte-level tokenizer needs far longer for 300,000 characters than a 0.05 s render budget, which the
    render itself (a few milliseconds) stays well within."""
    from transformers import AutoTokenizer

    monkeypatch.setattr(masks, "RENDER_SECONDS", 0.05)
    _write_rows(corpus / "long_row.jsonl", [300_000])
    start = time.monotonic()
    AutoTokenizer.from_pretrained(corpus / "tokenizer")("An answer. " * 27_300)
    assert time.monotonic() - start > masks.RENDER_SECONDS  # tokenizing the row alone outlasts the budget
    code, output = _check_data(corpus, "long_row.jsonl", max_length=None)
    assert code == 0, output
    assert "ran longer" not in output
