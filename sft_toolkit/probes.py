"""The probe corpus: small conversations that exercise every path a chat template has.

Lint renders each probe (and every prefix of it, with and without the generation prompt) to see what
the template trains; the template tests render each probe with the bundled training template and the
family's original to prove they are byte-identical. Every message text is unique within its probe so
a rendered message can be found by searching for its text.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name."}},
            "required": ["city"],
        },
    },
}


@dataclass(frozen=True)
class Probe:
    name: str
    messages: list[dict]
    tools: list[dict] | None = None
    template_kwargs: dict = field(default_factory=dict)
    # Render the messages as given, None values included. Training drops keys whose value is None
    # (`apply_chat_template` does), but transformers' `render_jinja_template` and inference servers pass
    # `content: None` on to the template, where `content is none` picks another branch.
    keep_none: bool = False
    # False for a shape sft-toolkit's preprocessing changes before the template sees it (None keys dropped,
    # JSON-string arguments parsed) but other renderers pass on: checked where it renders, no warning where not.
    training_shape: bool = True


def _call(city: str, call_id: str | None = None, *, string_arguments: bool = False) -> dict:
    arguments = {"city": city}
    function = {"name": "get_weather", "arguments": json.dumps(arguments) if string_arguments else arguments}
    return {**({"id": call_id} if call_id else {}), "type": "function", "function": function}


PROBES: list[Probe] = [
    Probe(
        "single-turn",
        [
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "2 + 3 = 5."},
        ],
    ),
    Probe(
        "system",
        [
            {"role": "system", "content": "You are a terse calculator."},
            {"role": "user", "content": "What is 7 * 6?"},
            {"role": "assistant", "content": "42"},
        ],
    ),
    Probe(
        "multi-turn",
        [
            {"role": "user", "content": "Convert 3 km to metres."},
            {"role": "assistant", "content": "3 km is 3000 metres."},
            {"role": "user", "content": "And 2.5 km?"},
            {"role": "assistant", "content": "2.5 km is 2500 metres."},
            {"role": "user", "content": "Thanks! One more: 40 m in cm?"},
            {"role": "assistant", "content": "40 m is 4000 centimetres."},
        ],
    ),
    Probe(
        "multi-turn-system",
        [
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "Name a prime above 10."},
            {"role": "assistant", "content": "11 is a prime above 10."},
            {"role": "user", "content": "And one above 20?"},
            {"role": "assistant", "content": "23 is a prime above 20."},
        ],
    ),
    Probe(
        "multiline-unicode",
        [
            {"role": "user", "content": "Write two lines about caf\u00e9s \u2615."},
            {"role": "assistant", "content": "Caf\u00e9s hum at dawn,\n  cups clink \u2014 \u00fcber-cosy \u2615."},
        ],
    ),
    Probe(
        "reasoning",
        [
            {"role": "user", "content": "Is 91 prime?"},
            {
                "role": "assistant",
                "reasoning_content": "91 = 7 * 13, so it has divisors.",
                "content": "No: 91 = 7 \u00d7 13.",
            },
        ],
    ),
    Probe(
        "reasoning-multi-turn",
        [
            {"role": "user", "content": "Is 97 prime?"},
            {
                "role": "assistant",
                "reasoning_content": "Check 2, 3, 5, 7: none divide 97.",
                "content": "Yes, 97 is prime.",
            },
            {"role": "user", "content": "Is 99 prime?"},
            {"role": "assistant", "reasoning_content": "99 = 9 * 11.", "content": "No, 99 = 9 \u00d7 11."},
        ],
    ),
    Probe(
        "tool-call",
        [
            {"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [_call("Paris")]},
            {"role": "tool", "name": "get_weather", "content": '{"temperature_c": 18, "sky": "cloudy"}'},
            {"role": "assistant", "content": "It is 18 \u00b0C and cloudy in Paris."},
        ],
        tools=[WEATHER_TOOL],
    ),
    Probe(
        "tool-call-system",
        [
            {"role": "system", "content": "You can look up the weather."},
            {"role": "user", "content": "Weather in Oslo and Rome?"},
            {"role": "assistant", "content": "", "tool_calls": [_call("Oslo"), _call("Rome")]},
            {"role": "tool", "name": "get_weather", "content": '{"temperature_c": 4}'},
            {"role": "tool", "name": "get_weather", "content": '{"temperature_c": 21}'},
            {"role": "assistant", "content": "Oslo is 4 \u00b0C, Rome is 21 \u00b0C."},
        ],
        tools=[WEATHER_TOOL],
    ),
    Probe(
        # Text beside a tool call, and a second round of tool use in the same answer.
        "tool-calls-with-text",
        [
            {"role": "user", "content": "Compare the weather in Oslo and Rome."},
            {"role": "assistant", "content": "Let me check Oslo first.", "tool_calls": [_call("Oslo")]},
            {"role": "tool", "name": "get_weather", "content": '{"temperature_c": 4}'},
            {"role": "assistant", "content": "", "tool_calls": [_call("Rome")]},
            {"role": "tool", "name": "get_weather", "content": '{"temperature_c": 21}'},
            {"role": "assistant", "content": "Oslo is 4 \u00b0C and Rome is 21 \u00b0C."},
        ],
        tools=[WEATHER_TOOL],
    ),
    Probe(
        # Reasoning before a tool call, the conversation waiting for the tool: templates that keep reasoning
        # only until a final answer (gpt-oss) show it here, and with it a second message header in one turn.
        "tool-call-reasoning",
        [
            {"role": "user", "content": "Is it warm in Lisbon today?"},
            {
                "role": "assistant",
                "reasoning_content": "I need the current weather in Lisbon.",
                "content": "",
                "tool_calls": [_call("Lisbon")],
            },
            {"role": "tool", "name": "get_weather", "content": '{"temperature_c": 24}'},
        ],
        tools=[WEATHER_TOOL],
    ),
]


# The tool-call shapes real datasets write (OpenAI's format and its variants), each in its own probe so
# that a template branch only one of them takes is traced and verified: `content` empty or null beside the
# calls (as training gives it, the key dropped, and as given), parallel calls with ids, arguments as a
# JSON string, results naming their call by `tool_call_id` only, reasoning under `thinking`, a
# conversation that ends in a tool call. Lint and add-markers run these after PROBES; the bundled
# templates' hand-written expectations (tests/test_templates.py) cover PROBES only.
_NULL_CONTENT = [
    {"role": "user", "content": "Is it raining in Bergen or in Cork?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [_call("Bergen", "call_bergen1"), _call("Cork", "call_cork01")],
    },
    {"role": "tool", "tool_call_id": "call_bergen1", "name": "get_weather", "content": '{"rain_mm": 12}'},
    {"role": "tool", "tool_call_id": "call_cork01", "name": "get_weather", "content": '{"rain_mm": 0}'},
    {"role": "assistant", "content": "Bergen has rain (12 mm); Cork is dry."},
]

TOOL_SHAPE_PROBES: list[Probe] = [
    Probe("tool-call-null-content", _NULL_CONTENT, tools=[WEATHER_TOOL]),
    Probe(
        "tool-call-null-content-as-given", _NULL_CONTENT, tools=[WEATHER_TOOL], keep_none=True, training_shape=False
    ),
    Probe(
        "tool-call-string-arguments",
        [
            {"role": "system", "content": "Report temperatures in Celsius."},
            {"role": "user", "content": "How cold is Tromso right now?"},
            {
                "role": "assistant",
                "content": "Checking Tromso.",
                "tool_calls": [_call("Tromso", "call_tromso", string_arguments=True)],
            },
            {"role": "tool", "tool_call_id": "call_tromso", "content": '{"temperature_c": -9}'},
            {"role": "assistant", "content": "Tromso is at -9 \u00b0C."},
        ],
        tools=[WEATHER_TOOL],
        training_shape=False,
    ),
    Probe(
        "tool-call-thinking",
        [
            {"role": "user", "content": "Should I pack an umbrella for Dublin?"},
            {
                "role": "assistant",
                "thinking": "Dublin weather decides it.",
                "content": "",
                "tool_calls": [_call("Dublin", "call_dublin")],
            },
            {"role": "tool", "tool_call_id": "call_dublin", "name": "get_weather", "content": '{"rain_mm": 5}'},
            {"role": "assistant", "thinking": "5 mm means rain.", "content": "Yes, pack one: 5 mm of rain."},
        ],
        tools=[WEATHER_TOOL],
    ),
    Probe(
        "ends-in-tool-call",
        [
            {"role": "user", "content": "Look up Nairobi's weather for me."},
            {"role": "assistant", "content": None, "tool_calls": [_call("Nairobi", "call_nairobi")]},
        ],
        tools=[WEATHER_TOOL],
    ),
]

# What lint checks a template on and add-markers traces and verifies a converted template on.
VERIFICATION_PROBES: list[Probe] = [*PROBES, *TOOL_SHAPE_PROBES]


# Probes with per-message training control (`train` / `weight` fields, see sft_toolkit/policy.py): lint
# applies the control to the template's spans and checks that exactly the switched-off turns go untrained.
# Kept apart from PROBES because reference renderers (mistral-common) refuse messages with unknown keys.
CONTROL_PROBES: list[Probe] = [
    Probe(
        "turn-switched-off",
        [
            {"role": "user", "content": "Hi there!"},
            {"role": "assistant", "content": "Hello! How can I help you today?", "train": False},
            {"role": "user", "content": "How many grams are in 3 kg?"},
            {"role": "assistant", "content": "3 kg is 3000 grams."},
            {"role": "user", "content": "And in 0.5 kg?"},
            {"role": "assistant", "content": "0.5 kg is 500 grams.", "weight": 1},
        ],
    ),
]


def prefixes_ending_before_assistant(messages: list[dict]) -> list[int]:
    """Indices i such that messages[i] is an assistant turn: messages[:i] is what the model is prompted with."""
    return [i for i, m in enumerate(messages) if m.get("role") == "assistant"]


def text_of(content) -> str:
    """A message's text: the string itself, or its text parts joined (content as a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def probe_variants(probe: Probe):
    """The probe, then the same conversation with tool-call arguments as JSON strings, with content as a list
    of text parts, and with both (the shapes templates disagree on)."""

    def string_arguments(m):
        calls = [
            {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
            if not isinstance(c["function"]["arguments"], str)
            else c
            for c in m.get("tool_calls") or []
        ]
        return {**m, "tool_calls": calls} if calls else m

    def parts(m):
        content = m.get("content")
        return {**m, "content": [{"type": "text", "text": content}]} if isinstance(content, str) else m

    yield probe
    for change in (string_arguments, parts, lambda m: parts(string_arguments(m))):
        yield replace(probe, messages=[change(m) for m in probe.messages])


def fallback_variants(probe: Probe):
    """Shapes of a tool-calling probe for a template that renders none of `probe_variants`, so that its
    tool-call code is still traced and verified, not left unmarked and unchecked: each variant with
    Mistral-style ids (9 alphanumeric characters on every call, and the same id on the result that
    answers it; Mistral's templates raise on any other id), then each without the tool definitions (some
    templates fail on the `tools` they are given, but datasets often carry tool calls without them)."""
    if not any(m.get("tool_calls") for m in probe.messages):
        return
    variants = list(probe_variants(probe))
    with_ids = [replace(v, messages=_nine_character_ids(v.messages)) for v in variants]
    yield from with_ids
    if probe.tools:
        for variant in [*variants, *with_ids]:
            yield replace(variant, tools=None)


def _nine_character_ids(messages: list[dict]) -> list[dict]:
    """Every tool call numbered `call00001`, `call00002`, ...; each tool result takes the id of the call it
    answers (by its own `tool_call_id`, else the next call not yet answered)."""
    out, ids, waiting = [], {}, []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                new = f"call{len(ids) + 1:05d}"
                ids[call.get("id") or new] = new
                waiting.append(new)
                calls.append({**call, "id": new})
            out.append({**m, "tool_calls": calls})
        elif m.get("role") == "tool" and waiting:
            new = ids.get(m.get("tool_call_id"), waiting[0])
            if new in waiting:
                waiting.remove(new)
            out.append({**m, "tool_call_id": new})
        else:
            out.append(m)
    return out


def generated_conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """Conversations the probe corpus doesn't contain, to check a converted template beyond the probes it
    was verified on: random lengths, system prompts, reasoning on answers and on tool calls, text beside
    tool calls, one or two tool calls with their results. The same `seed` gives the same conversations."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta sun rain cloud river stone 42 7 km metres grams é ☕ yes no".split()

    def text():
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))).capitalize() + rng.choice(".?!")

    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": text()})
            if rng.random() < 0.35:
                call = {
                    "role": "assistant",
                    "content": text() if rng.random() < 0.3 else "",
                    "tool_calls": [_call(rng.choice(["Oslo", "Rome", "Lima"])) for _ in range(rng.randint(1, 2))],
                }
                if rng.random() < 0.5:
                    call["reasoning_content"] = text()
                messages.append(call)
                messages += [
                    {"role": "tool", "name": "get_weather", "content": f'{{"temperature_c": {rng.randint(-5, 35)}}}'}
                    for _ in call["tool_calls"]
                ]
            answer = {"role": "assistant", "content": text()}
            if rng.random() < 0.4:
                answer["reasoning_content"] = text()
            messages.append(answer)
        out.append(messages)
    return out
