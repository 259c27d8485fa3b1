"""The bundled training templates (templates/*.jinja) against the originals they reproduce.

For every template and every probe conversation (sft_toolkit.probes.PROBES, plus a few per-family
extras) two things are proven:

1. Byte identity: the bundled template renders exactly the text of the family's original, for
   every prefix that ends right before an assistant turn (with the generation prompt) and for the
   whole conversation (without and with it). Where the original refuses a conversation
   (raise_exception, or mistral-common raising), the bundled template must refuse it too.
2. Exact training text: the text inside the {% generation %} spans is, turn by turn, what the
   assistant writes (content / reasoning / tool call as the template renders it) plus its
   end-of-turn token, computed here from the messages by hand, and nothing else.

The originals are TRL's installed copies (trl/chat_templates/*.jinja), except Mistral's, which is
mistral-common's own renderer (v3 Tekken tokenizer shipped inside mistral-common). The last tests
break each template on purpose and show these checks notice.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import pytest
import trl

from sft_toolkit.masks import TemplateRaised, render
from sft_toolkit.probes import PROBES, Probe, prefixes_ending_before_assistant

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "templates"
TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
REJECTED = "<rejected by the template>"


# --------------------------------------------------------------------------------------------------
# The trained text each family should have, written out from the messages by hand.
# --------------------------------------------------------------------------------------------------


def _assistant_turns(messages: list[dict]) -> list[tuple[int, dict]]:
    return [(i, m) for i, m in enumerate(messages) if m["role"] == "assistant"]


def _calls(message: dict) -> list[dict]:
    return [call.get("function", call) for call in message.get("tool_calls") or []]


def _json(value) -> str:
    """What the templates' `tojson` writes (transformers: json.dumps, no ASCII escaping)."""
    return json.dumps(value, ensure_ascii=False)


def _hermes_call(call: dict) -> str:
    return '<tool_call>\n{"name": "' + call["name"] + '", "arguments": ' + _json(call["arguments"]) + "}\n</tool_call>"


def chatml_trained(messages: list[dict], kwargs: dict) -> list[str]:
    """Qwen2.5: content, then one <tool_call> block per call ('\\n' between the pieces), then <|im_end|>."""
    out = []
    for _, m in _assistant_turns(messages):
        pieces = ([m["content"]] if m.get("content") else []) + [_hermes_call(c) for c in _calls(m)]
        out.append("\n".join(pieces) + "<|im_end|>")
    return out


def qwen3_trained(messages: list[dict], kwargs: dict) -> list[str]:
    """Qwen3: as ChatML, but turns after the last user query get a <think> block, which the final
    turn always gets (empty if it has no reasoning) and earlier ones only when they have reasoning.
    (Written for messages whose content holds no inline <think>...</think>, like the probes.)"""
    queries = [
        i
        for i, m in enumerate(messages)
        if m["role"] == "user"
        and not (m["content"].startswith("<tool_response>") and m["content"].endswith("</tool_response>"))
    ]
    last_query = queries[-1] if queries else len(messages) - 1
    out = []
    for i, m in _assistant_turns(messages):
        content = m.get("content", "")
        reasoning = m.get("reasoning_content", "")
        is_last = i == len(messages) - 1
        text = content
        if i > last_query and (is_last or reasoning):
            text = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
        calls = [_hermes_call(c) for c in _calls(m)]
        if calls:
            text += ("\n" if content else "") + "\n".join(calls)
        out.append(text + "<|im_end|>")
    return out


def llama3_trained(messages: list[dict], kwargs: dict) -> list[str]:
    """Llama 3.1/3.2: trimmed content + <|eot_id|>; a (single) tool call as JSON with "parameters",
    or, for a built-in tool, <|python_tag|>name.call(k="v") ending in <|eom_id|>."""
    builtin = kwargs.get("builtin_tools")
    out = []
    for _, m in _assistant_turns(messages):
        if "tool_calls" in m:
            call = _calls(m)[0]  # the template refuses a turn with more than one call
            if builtin and call["name"] in builtin:
                args = ", ".join(f'{k}="{v}"' for k, v in call["arguments"].items())
                text = f"<|python_tag|>{call['name']}.call({args})"
            else:
                text = '{"name": "' + call["name"] + '", "parameters": ' + _json(call["arguments"]) + "}"
            out.append(text + ("<|eom_id|>" if builtin else "<|eot_id|>"))
        else:
            out.append(m["content"].strip() + "<|eot_id|>")
    return out


def gemma_trained(messages: list[dict], kwargs: dict) -> list[str]:
    """Gemma: trimmed content + <end_of_turn> (the template has no tool calls)."""
    return [m["content"].strip() + "<end_of_turn>" for _, m in _assistant_turns(messages)]


def phi3_trained(messages: list[dict], kwargs: dict) -> list[str]:
    """Phi-3: content + <|end|>. The template ignores tool calls, so a tool-call turn is just <|end|>;
    the eos_token appended after the last turn is not trained (see templates/phi3.jinja)."""
    return [m["content"] + "<|end|>" for _, m in _assistant_turns(messages)]


def mistral_trained(messages: list[dict], kwargs: dict) -> list[str]:
    """Mistral v3: content without trailing spaces, or [TOOL_CALLS] + the JSON list of calls
    (name, arguments, id), then </s>."""
    out = []
    for _, m in _assistant_turns(messages):
        if m.get("tool_calls"):
            calls = []
            for tc in m["tool_calls"]:
                call = {"name": tc["function"]["name"], "arguments": tc["function"]["arguments"]}
                if tc.get("id"):
                    call["id"] = tc["id"]
                calls.append(call)
            out.append("[TOOL_CALLS]" + _json(calls) + "</s>")
        else:
            out.append(m["content"].rstrip(" ") + "</s>")
    return out


# --------------------------------------------------------------------------------------------------
# References: TRL's original templates, and mistral-common for Mistral.
# --------------------------------------------------------------------------------------------------


def _render_text(source: str, messages, add_generation_prompt, tools, kwargs) -> str:
    try:
        return render(
            source, messages, add_generation_prompt=add_generation_prompt, tools=tools, template_kwargs=kwargs
        ).text
    except TemplateRaised:
        return REJECTED


@cache
def _trl_source(stem: str) -> str:
    return (TRL_TEMPLATES / f"{stem}.jinja").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _mistral_tokenizer():
    import mistral_common
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = Path(mistral_common.__file__).parent / "data" / "tekken_240718.json"
    # agnostic: all content checks, but no rule on the last role (a prompt ends with a user or tool
    # message, a training example with an assistant one).
    return MistralTokenizer.from_file(path, mode=ValidationMode.agnostic)


def mistral_reference(messages, add_generation_prompt, tools, kwargs) -> str:
    """mistral-common's rendered text. The format has no generation prompt (the reply follows
    [/INST] directly), so both add_generation_prompt values compare against the same text.
    reasoning_content is dropped first: v3 requests have no such field (mistral-common would refuse
    the unknown key), and the v3 format renders no reasoning."""
    from mistral_common.exceptions import MistralCommonException
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
    from pydantic import ValidationError

    cleaned = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]
    try:
        request = ChatCompletionRequest(messages=cleaned, tools=tools)
        tokenizer = _mistral_tokenizer()
        tokens = tokenizer.encode_chat_completion(request).tokens
    except (MistralCommonException, ValidationError):
        return REJECTED
    # The same text as `Tokenized.text` (deprecated): the tokens decoded with control tokens kept.
    return tokenizer.decode(tokens, special_token_policy=SpecialTokenPolicy.KEEP)


# --------------------------------------------------------------------------------------------------
# The families, and probes only some of them get.
# --------------------------------------------------------------------------------------------------


def _with_tool_call_ids(probe: Probe) -> Probe:
    """The probe with 9-character tool-call ids (call00001, ...) and matching tool_call_ids, which
    Mistral's format requires."""
    messages = copy.deepcopy(probe.messages)
    ids: list[str] = []
    answered = 0
    for m in messages:
        for tc in m.get("tool_calls") or []:
            tc["id"] = f"call{len(ids) + 1:05d}"
            ids.append(tc["id"])
        if m["role"] == "tool":
            m["tool_call_id"] = ids[answered]
            answered += 1
    return Probe(probe.name + "-with-ids", messages, probe.tools, probe.template_kwargs)


LLAMA_BUILTIN_TOOL = Probe(
    "builtin-tool",
    [
        {"role": "user", "content": "How tall is the Eiffel Tower?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "brave_search", "arguments": {"query": "Eiffel Tower height"}},
                }
            ],
        },
        {"role": "ipython", "content": "330 metres"},
        {"role": "assistant", "content": "It is 330 metres tall."},
    ],
    template_kwargs={"builtin_tools": ["brave_search", "wolfram_alpha"]},
)


# Qwen3 with thinking switched off: the generation prompt gains an empty <think> block (untrained).
NO_THINKING = Probe(
    "reasoning-multi-turn-no-thinking",
    next(p for p in PROBES if p.name == "reasoning-multi-turn").messages,
    template_kwargs={"enable_thinking": False},
)


@dataclass(frozen=True)
class Family:
    name: str  # bundled template name: templates/<name>.jinja
    reference: str  # TRL template stem, or "mistral-common"
    trained: Callable[[list[dict], dict], list[str]]
    extra_probes: list[Probe] = field(default_factory=list)

    def source(self) -> str:
        return (TEMPLATES_DIR / f"{self.name}.jinja").read_text(encoding="utf-8")

    def reference_text(self, messages, add_generation_prompt, tools, kwargs) -> str:
        if self.reference == "mistral-common":
            return mistral_reference(messages, add_generation_prompt, tools, kwargs)
        return _render_text(_trl_source(self.reference), messages, add_generation_prompt, tools, kwargs)


FAMILIES = [
    Family("chatml", "qwen2_5", chatml_trained),
    Family("qwen3", "qwen3", qwen3_trained, [NO_THINKING]),
    Family("llama3", "llama3_1", llama3_trained, [LLAMA_BUILTIN_TOOL]),
    Family("llama3_2", "llama3_2", llama3_trained),
    Family("gemma", "gemma3", gemma_trained),
    Family("gemma2", "gemma", gemma_trained),
    Family("phi3", "phi3", phi3_trained),
    Family("phi3_5", "phi3_5", phi3_trained),
    Family("mistral", "mistral-common", mistral_trained, [_with_tool_call_ids(p) for p in PROBES if p.tools]),
]
BY_NAME = {f.name: f for f in FAMILIES}
CASES = [(f, p) for f in FAMILIES for p in [*PROBES, *f.extra_probes]]
CASE_IDS = [f"{f.name}-{p.name}" for f, p in CASES]

# Whole conversations the originals refuse; ours must refuse exactly these too (checked below).
REJECTED_PROBES = {
    (
        "llama3",
        "tool-call-system",
    ): "two tool calls in one turn: 'This model only supports single tool-calls at once!'",
    ("llama3_2", "tool-call-system"): "two tool calls in one turn",
    ("gemma", "tool-call"): "a tool message breaks the strict user/assistant alternation",
    ("gemma", "tool-call-system"): "a tool message breaks the strict user/assistant alternation",
    ("gemma2", "system"): "'System role not supported'",
    ("gemma2", "multi-turn-system"): "'System role not supported'",
    ("gemma2", "tool-call"): "a tool message breaks the strict user/assistant alternation",
    ("gemma2", "tool-call-system"): "'System role not supported'",
    ("mistral", "tool-call"): "tool calls without ids (mistral-common requires 9-character ids)",
    ("mistral", "tool-call-system"): "tool calls without ids (mistral-common requires 9-character ids)",
    ("gemma", "tool-call-reasoning"): "a tool message breaks the strict user/assistant alternation",
    ("gemma2", "tool-call-reasoning"): "a tool message breaks the strict user/assistant alternation",
    ("mistral", "tool-call-reasoning"): "tool calls without ids (mistral-common requires 9-character ids)",
    ("gemma", "tool-calls-with-text"): "a tool message breaks the strict user/assistant alternation",
    ("gemma2", "tool-calls-with-text"): "a tool message breaks the strict user/assistant alternation",
    ("mistral", "tool-calls-with-text"): "tool calls without ids (mistral-common requires 9-character ids)",
    ("mistral", "tool-calls-with-text-with-ids"): "mistral-common refuses text beside tool calls",
}


# --------------------------------------------------------------------------------------------------
# The checks (returning the problems found, so the broken-variant tests can reuse them).
# --------------------------------------------------------------------------------------------------


def _renders(probe: Probe) -> list[tuple[list[dict], bool]]:
    """(messages, add_generation_prompt) for every prefix before an assistant turn, and the whole."""
    cases = [(probe.messages[:i], True) for i in prefixes_ending_before_assistant(probe.messages)]
    return cases + [(probe.messages, False), (probe.messages, True)]


def _label(messages, add_generation_prompt) -> str:
    return f"{len(messages)} messages, add_generation_prompt={add_generation_prompt}"


def identity_problems(family: Family, source: str, probe: Probe) -> list[str]:
    problems = []
    for messages, agp in _renders(probe):
        ours = _render_text(source, messages, agp, probe.tools, probe.template_kwargs)
        theirs = family.reference_text(messages, agp, probe.tools, probe.template_kwargs)
        if ours != theirs:
            problems.append(f"{_label(messages, agp)}:\n  ours:      {ours!r}\n  reference: {theirs!r}")
    return problems


def training_problems(family: Family, source: str, probe: Probe) -> list[str]:
    problems = []
    for messages, agp in _renders(probe):
        try:
            rendered = render(
                source, messages, add_generation_prompt=agp, tools=probe.tools, template_kwargs=probe.template_kwargs
            )
        except TemplateRaised:
            continue  # refusals are the identity check's business
        trained = [rendered.text[s:e] for s, e in rendered.spans]
        expected = family.trained(messages, probe.template_kwargs)
        if trained != expected:
            problems.append(f"{_label(messages, agp)}:\n  trained:  {trained!r}\n  expected: {expected!r}")
    return problems


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "probe"), CASES, ids=CASE_IDS)
def test_renders_byte_identically_to_the_original(family: Family, probe: Probe):
    problems = identity_problems(family, family.source(), probe)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("family", "probe"), CASES, ids=CASE_IDS)
def test_trains_exactly_each_assistant_turn_and_its_end_token(family: Family, probe: Probe):
    problems = training_problems(family, family.source(), probe)
    assert not problems, "\n".join(problems)
    # Not vacuous: a conversation the template accepts trains every assistant turn.
    if (family.name, probe.name) not in REJECTED_PROBES:
        rendered = render(family.source(), probe.messages, tools=probe.tools, template_kwargs=probe.template_kwargs)
        assert len(rendered.spans) == len(_assistant_turns(probe.messages))


def test_refusals_are_exactly_the_documented_ones():
    refused = set()
    for family, probe in CASES:
        ours = _render_text(family.source(), probe.messages, False, probe.tools, probe.template_kwargs)
        theirs = family.reference_text(probe.messages, False, probe.tools, probe.template_kwargs)
        assert (ours == REJECTED) == (theirs == REJECTED), (family.name, probe.name)
        if ours == REJECTED:
            refused.add((family.name, probe.name))
    assert refused == set(REJECTED_PROBES)


def test_every_bundled_template_is_tested_and_says_what_it_reproduces():
    assert sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja")) == sorted(BY_NAME)
    for family in FAMILIES:
        source = family.source()
        assert source.startswith("{#-"), family.name
        header = source[: source.index("-#}")]
        assert family.name + ":" in header and "generation" in header, family.name
        assert (
            (family.reference in header)
            if family.reference == "mistral-common"
            else (f"trl/chat_templates/{family.reference}.jinja" in header)
        )
        assert source.count("{%- generation %}") == source.count("{%- endgeneration %}") >= 1


# Each template broken on purpose ((old, new) edits, each old text found once), the probe that shows
# it, and which check must catch it. Every pair also passes on the real template: the checks fail the broken one
# and pass the fixed one.
BROKEN = {
    # TRL's qwen2_5_training mistake: the header's '\n' inside the trained block.
    "chatml": (
        [
            (
                "{{- '<|im_start|>' + message.role + '\\n' }}\n        {%- generation %}\n            {{- message.content + '<|im_end|>' }}",
                "{{- '<|im_start|>' + message.role }}\n        {%- generation %}\n            {{- '\\n' + message.content + '<|im_end|>' }}",
            )
        ],
        "multi-turn",
        training_problems,
    ),
    # TRL's qwen3_training change: a <think> block on every turn renders different text.
    "qwen3": (
        [
            (
                "{%- if loop.index0 > ns.last_query_index %}\n                {%- if loop.last or (not loop.last and reasoning_content) %}",
                "{%- if true %}\n                {%- if true %}",
            )
        ],
        "reasoning-multi-turn",
        identity_problems,
    ),
    # <|eot_id|> left out of the trained block: the model would never learn to stop.
    "llama3": (
        [
            (
                "{{- message['content'] | trim + '<|eot_id|>' }}\n            {%- endgeneration %}",
                "{{- message['content'] | trim }}\n            {%- endgeneration %}\n            {{- '<|eot_id|>' }}",
            )
        ],
        "single-turn",
        training_problems,
    ),
    # The tool-call turn not marked: only the turn after the tool result would be trained.
    "llama3_2": (
        [
            ('        {%- generation %}\n            {{- \'{"name": "\'', '            {{- \'{"name": "\''),
            (
                '        {%- endgeneration %}\n    {%- elif message.role == "tool"',
                '    {%- elif message.role == "tool"',
            ),
        ],
        "tool-call",
        training_problems,
    ),
    # The newline after <end_of_turn> inside the trained block.
    "gemma": (
        [
            (
                "{{- '<end_of_turn>' }}\n        {%- endgeneration %}\n        {{- '\\n' }}",
                "{{- '<end_of_turn>\\n' }}\n        {%- endgeneration %}",
            )
        ],
        "multi-turn-system",
        training_problems,
    ),
    # The role header (the generation prompt) inside the trained block.
    "gemma2": (
        [
            (
                "{{- '<start_of_turn>' + role + '\\n' }}\n        {%- generation %}",
                "{%- generation %}\n        {{- '<start_of_turn>' + role + '\\n' }}",
            )
        ],
        "multi-turn",
        training_problems,
    ),
    # The trailing eos_token trained (we decided it is not part of any turn).
    "phi3": (
        [
            (
                "{%- else %}\n    {{- eos_token }}",
                "{%- else %}\n    {%- generation %}{{- eos_token }}{%- endgeneration %}",
            )
        ],
        "single-turn",
        training_problems,
    ),
    # No markers at all: nothing trained.
    "phi3_5": (
        [
            (
                "        {%- generation %}\n            {{- message['content'] + '<|end|>' }}\n        {%- endgeneration %}",
                "        {{- message['content'] + '<|end|>' }}",
            )
        ],
        "multi-turn",
        training_problems,
    ),
    # The system prompt in the first user turn (as some Hub templates do) instead of the last.
    "mistral": (
        [("{%- if loop.index0 == ns.last_run_start %}", "{%- if loop.index0 == ns.first_turn %}")],
        "multi-turn-system",
        identity_problems,
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_checks_fail_a_broken_variant_and_pass_the_real_one(name: str):
    edits, probe_name, check = BROKEN[name]
    family = BY_NAME[name]
    probe = next(p for p in PROBES if p.name == probe_name)
    source = broken = family.source()
    for old, new in edits:
        assert broken.count(old) == 1, f"{name}: the text to break is not (once) in the template: {old!r}"
        broken = broken.replace(old, new)
    assert check(family, broken, probe), f"{name}: the broken variant passed {check.__name__}"
    assert not check(family, source, probe)
