"""Per-message training control (sft_toolkit/policy.py): each policy against real tokenizers, check-data's
accounting of rows it switches off entirely, the recipe keys, and a property over generated conversations.

"Trained spans" below are the runs of tokens whose label is not -100, decoded: what the trainer learns.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mask_properties import TEXT

from sft_toolkit import offline_tokenizers, preprocess
from sft_toolkit.check_data import REASON_HELP, check_data
from sft_toolkit.lint import _check_probe
from sft_toolkit.masks import Rendered, TemplateRaised, render
from sft_toolkit.policy import MappingError, TurnPolicy, kept_spans, policy_from, selected, strip_control
from sft_toolkit.probes import CONTROL_PROBES, PROBES, Probe
from sft_toolkit.problems import InputError
from sft_toolkit.recipe import build_recipe, load_recipe
from sft_toolkit.templates import bundled_names, load_template
from sft_toolkit.turns import end_of_turn

TOOL_CALL = next(p for p in PROBES if p.name == "tool-call")
MULTI_TURN = next(p for p in PROBES if p.name == "multi-turn")

# (bundled template, offline tokenizer, end-of-turn text) for the families whose tokenizers we have.
FAMILIES = [
    ("chatml", "qwen2", "<|im_end|>"),
    ("llama3", "llama3", "<|eot_id|>"),
    ("mistral", "mistral_tekken", "</s>"),
]


def trained_spans(tokenizer, template: str, messages, tools=None, policy: TurnPolicy | None = None) -> list[str]:
    out = preprocess._tokenize_row(
        {"messages": messages, "tools": tools}, 0, tokenizer, template, True, policy=policy or TurnPolicy()
    )
    assert out["problem"] == ""
    runs, current = [], []
    for token, label in zip(out["input_ids"] + [None], out["labels"] + [-100]):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def flagged(messages, **flags_by_index):
    """A copy of `messages` with control fields: flagged(m, _1={"train": False})."""
    copy = [dict(m) for m in messages]
    for key, fields in flags_by_index.items():
        copy[int(key.lstrip("_"))].update(fields)
    return copy


@pytest.fixture(scope="module", params=FAMILIES, ids=[f[0] for f in FAMILIES])
def family(request):
    name, tokenizer, eot = request.param
    return load_template(name).source, offline_tokenizers.load(tokenizer), eot


# ------------------------------------------------------------------------------ each policy, real tokens


def test_train_false_switches_off_exactly_that_turn(family):
    template, tokenizer, eot = family
    messages = flagged(MULTI_TURN.messages, _1={"train": False})
    assert trained_spans(tokenizer, template, messages) == [
        f"{MULTI_TURN.messages[3]['content']}{eot}",
        f"{MULTI_TURN.messages[5]['content']}{eot}",
    ]


def test_weight_is_an_alias_of_train(family):
    template, tokenizer, _ = family
    by_weight = flagged(MULTI_TURN.messages, _3={"weight": 0}, _5={"weight": 1})
    by_train = flagged(MULTI_TURN.messages, _3={"train": False}, _5={"train": True})
    assert trained_spans(tokenizer, template, by_weight) == trained_spans(tokenizer, template, by_train)
    assert len(trained_spans(tokenizer, template, by_weight)) == 2


def test_train_turns_last(family):
    template, tokenizer, eot = family
    spans = trained_spans(tokenizer, template, MULTI_TURN.messages, policy=TurnPolicy(turns="last"))
    assert spans == [f"{MULTI_TURN.messages[5]['content']}{eot}"]


def test_a_message_flag_overrides_the_recipe_policy(family):
    template, tokenizer, eot = family
    messages = flagged(MULTI_TURN.messages, _1={"train": True})
    spans = trained_spans(tokenizer, template, messages, policy=TurnPolicy(turns="last"))
    assert spans == [f"{MULTI_TURN.messages[1]['content']}{eot}", f"{MULTI_TURN.messages[5]['content']}{eot}"]


@pytest.mark.parametrize("name,tokenizer", [("chatml", "qwen2"), ("llama3", "llama3"), ("qwen3", "qwen2")])
def test_tool_calls_vs_answers(name, tokenizer):
    """Tool results are never trained; train_roles picks the assistant turns that call tools or answer."""
    template, tok = load_template(name).source, offline_tokenizers.load(tokenizer)
    everything = trained_spans(tok, template, TOOL_CALL.messages, TOOL_CALL.tools)
    call, answer = everything  # the template's own output for the two assistant turns, nothing of the tool result
    assert "get_weather" in call and "Paris" in answer and "temperature_c" not in "".join(everything)
    assert trained_spans(tok, template, TOOL_CALL.messages, TOOL_CALL.tools, TurnPolicy(roles=("answers",))) == [
        answer
    ]
    assert trained_spans(tok, template, TOOL_CALL.messages, TOOL_CALL.tools, TurnPolicy(roles=("tool_calls",))) == [
        call
    ]
    assert (
        trained_spans(tok, template, TOOL_CALL.messages, TOOL_CALL.tools, TurnPolicy(roles=("answers", "tool_calls")))
        == everything
    )


def test_old_reasoning_dropped_by_the_template_still_maps(qwen_tokenizer):
    """Qwen3 drops the reasoning of earlier turns; train_turns: last trains the final answer with its thinking."""
    probe = next(p for p in PROBES if p.name == "reasoning-multi-turn")
    spans = trained_spans(
        qwen_tokenizer, load_template("qwen3").source, probe.messages, policy=TurnPolicy(turns="last")
    )
    assert spans == ["<think>\n99 = 9 * 11.\n</think>\n\nNo, 99 = 9 × 11.<|im_end|>"]


def test_without_control_the_mask_is_the_templates(family):
    """All flags true, or none: labels identical to TRL's own (no re-rendering path taken or needed)."""
    template, tokenizer, _ = family
    plain = preprocess._tokenize_row(
        {"messages": MULTI_TURN.messages}, 0, tokenizer, template, True, policy=TurnPolicy()
    )
    all_on = flagged(MULTI_TURN.messages, _1={"train": True}, _3={"weight": 1}, _5={"train": True})
    on = preprocess._tokenize_row({"messages": all_on}, 0, tokenizer, template, True, policy=TurnPolicy())
    assert on["labels"] == plain["labels"] and on["input_ids"] == plain["input_ids"]


@pytest.mark.parametrize("name", bundled_names())
def test_control_fields_never_change_the_rendered_text(name):
    """Templates ignore unknown keys; the toolkit strips them anyway. Both give the same text and spans."""
    template = load_template(name).source
    for probe in CONTROL_PROBES:
        try:
            with_fields = render(template, probe.messages, tools=probe.tools)
        except TemplateRaised:
            continue
        assert with_fields == render(template, strip_control(probe.messages), tools=probe.tools)


# ------------------------------------------------------------------------------ check-data and recipes


def test_check_data_names_rows_with_every_turn_switched_off(tmp_path):
    rows = [
        {"messages": MULTI_TURN.messages},
        {"messages": flagged(MULTI_TURN.messages, _1={"train": False}, _3={"train": False}, _5={"weight": 0})},
        {"messages": TOOL_CALL.messages, "tools": json.dumps(TOOL_CALL.tools)},
    ]
    report, dataset = check_data(load_recipe(write_recipe(tmp_path, rows)))
    assert report.zero_mask_rows == [{"index": 1, "reason": "all_turns_switched_off"}]
    assert not report.ok and REASON_HELP["all_turns_switched_off"]
    assert report.dropped_rows == 1 and len(dataset) == 2  # the trainer never sees it

    # train_roles: [answers] switches off the tool-call turn only; row 0 and 2 keep their answers.
    report, _ = check_data(load_recipe(write_recipe(tmp_path, rows, train_roles=["answers"], train_turns="last")))
    assert report.zero_mask_rows == [{"index": 1, "reason": "all_turns_switched_off"}]


def test_a_marked_message_the_template_does_not_train_is_an_error(tmp_path):
    rows = [
        {"messages": MULTI_TURN.messages},
        {"messages": flagged(TOOL_CALL.messages, _2={"train": True}), "tools": json.dumps(TOOL_CALL.tools)},
    ]
    with pytest.raises(InputError, match=r"row 1: messages\[2\] \(role 'tool'\) is marked to train"):
        check_data(load_recipe(write_recipe(tmp_path, rows)))


def test_template_without_one_block_per_turn_is_refused_naming_the_row(tmp_path):
    """Two assistant messages in a row, and one block for both: which message it belongs to is unknowable."""
    last_only = __import__("pathlib").Path(__file__).parent / "fixtures" / "templates" / "R001_last_turn_only.jinja"
    in_a_row = MULTI_TURN.messages[:2] + [{"role": "assistant", "content": "Anything else?"}]
    rows = [{"messages": MULTI_TURN.messages[:2]}, {"messages": in_a_row}]
    path = write_recipe(tmp_path, rows, chat_template_path=str(last_only), train_turns="last")
    with pytest.raises(InputError, match=r"row 1: the template writes 1 generation block\(s\) for 2 assistant"):
        check_data(load_recipe(path))


# Two blocks per assistant turn (content, then the end-of-turn), as add-markers often writes them.
TWO_BLOCKS = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}"
    "{%- if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
    "{% generation %}{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else %}{{ m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_several_blocks_of_one_turn_are_switched_off_together():
    tokenizer = offline_tokenizers.load("qwen2")
    messages = flagged(MULTI_TURN.messages, _1={"train": False})
    kept = trained_spans(tokenizer, TWO_BLOCKS, messages)
    assert kept == [m["content"] + "<|im_end|>" for m in MULTI_TURN.messages[3::2]]


@pytest.mark.parametrize(
    "keys,message",
    [
        ({"train_roles": ["tool"]}, "tool results are input, never trained"),
        ({"train_roles": ["assistent"]}, "is not one of assistant, answers, tool_calls"),
        ({"train_turns": "first"}, "is not one of all, last"),
        ({"train_turns": "last", "assistant_only_loss": False}, "needs assistant_only_loss: true"),
    ],
)
def test_bad_policy_keys_are_input_errors(keys, message):
    base = {"model_name_or_path": "m", "dataset_name": "d.jsonl", "assistant_only_loss": True}
    with pytest.raises(InputError, match=message):
        build_recipe({**base, **keys})


def test_bad_message_fields_name_row_and_field(tmp_path):
    rows = [{"messages": flagged(MULTI_TURN.messages, _1={"weight": 0.5})}]
    with pytest.raises(InputError, match=r"row 0: messages\[1\].weight must be 0 or 1"):
        check_data(load_recipe(write_recipe(tmp_path, rows)))


def test_message_fields_without_assistant_only_loss_are_an_error(tmp_path):
    rows = [{"messages": flagged(MULTI_TURN.messages, _1={"train": False})}]
    with pytest.raises(InputError, match=r"row 0: per-message training control .* needs assistant_only_loss: true"):
        check_data(load_recipe(write_recipe(tmp_path, rows, assistant_only_loss=False)))


def test_policy_parsing():
    assert policy_from(None, "all").is_default
    assert policy_from(["answers", "tool_calls"], "all").is_default
    assert not policy_from(["answers"], "all").is_default and not policy_from(None, "last").is_default


# ------------------------------------------------------------------------------ property


@st.composite
def flagged_conversations(draw):
    """User/assistant exchanges with random train / weight / absent flags on the assistant turns."""
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        answer = {"role": "assistant", "content": draw(TEXT)}
        field = draw(st.sampled_from([None, "train", "weight"]))
        if field:
            on = draw(st.booleans())
            answer[field] = on if field == "train" else int(on)
        messages += [{"role": "user", "content": draw(TEXT)}, answer]
    texts = [m["content"] for m in messages]
    if len(set(texts)) != len(texts) or any(a != b and a in b for a in texts for b in texts):
        from hypothesis import reject

        reject()
    return messages, draw(st.sampled_from(["all", "last"]))


@pytest.mark.parametrize("name", bundled_names())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=flagged_conversations())
def test_trained_text_is_exactly_the_selected_turns(name, case):
    """Lint's turn finder (independent of the spans) checks the controlled render: every selected turn's
    content and end-of-turn trained, nothing of a switched-off turn, nothing outside assistant turns."""
    messages, turns = case
    source = load_template(name).source
    try:
        full = render(source, strip_control(messages))
    except TemplateRaised:
        return
    policy = TurnPolicy(turns=turns)
    off = frozenset(i for i, on in selected(messages, policy).items() if not on)
    controlled = Rendered(full.text, kept_spans(messages, full, policy))
    eot = end_of_turn(source, PROBES[0], {})
    problems = _check_probe(source, Probe("generated", messages), controlled, eot, {}, off)
    assert [(rule, msg) for rule, _, msg, _, _ in problems if rule in ("R001", "R002", "R003", "R008")] == []
    assert len(controlled.spans) == len(selected(messages, policy)) - len(off)


def test_show_draws_a_conversation_as_training_sees_it(tmp_path, capsys):
    from sft_toolkit.cli import main

    conversation = tmp_path / "c.json"
    conversation.write_text(json.dumps(flagged(MULTI_TURN.messages, _1={"train": False})))
    assert (
        main(["show", str(conversation), "--template", "chatml", "--tokenizer", "offline:qwen2", "--format", "plain"])
        == 0
    )
    runs = re.findall(r"⟦(.*?)⟧", capsys.readouterr().out, flags=re.S)
    assert [run.replace("│", "") for run in runs] == [f"{MULTI_TURN.messages[i]['content']}<|im_end|>" for i in (3, 5)]


def test_assistant_messages_in_a_row_are_not_guessed_apart():
    """A template that skips an empty assistant message: the neighbour's end-of-turn block must not be taken
    for the empty message's, or switching the neighbour off would still train its end-of-turn."""
    skips_empty = (
        "{%- for m in messages -%}{%- if m.role != 'assistant' -%}"
        "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
        "{%- elif m.content -%}{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% generation %}{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{%- endif -%}{%- endfor -%}"
    )
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "A bad answer.", "train": False},
        {"role": "assistant", "content": "", "train": True},
        {"role": "user", "content": "Ok"},
        {"role": "assistant", "content": "Good."},
    ]
    with pytest.raises(MappingError, match="4 generation block"):
        kept_spans(messages, render(skips_empty, strip_control(messages)), TurnPolicy())
