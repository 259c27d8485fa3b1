"""Trace: render the probe corpus through an instrumented copy of the template, recording which piece of the
source emitted every output character, for which message of the conversation loop (step 1 of `markers`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import jinja2
from jinja2 import nodes

from ..lint import setting_label
from ..masks import RenderLimit, TemplateRaised, normalize_messages, template_error_text
from ..probes import PROBES, VERIFICATION_PROBES, Probe, text_of
from ..problems import InputError
from ..turns import end_of_turn, render_probe, usable_probe
from .label import Label, label_characters
from .source import MarkerError, Piece, Template, with_special_tokens


@dataclass
class Emission:
    piece: int
    start: int
    end: int
    role: str | None      # role of the innermost message being looped over, if any
    loop: int | None      # id of that for-loop node
    iteration: int | None = None  # which pass through that loop
    started: bool = False  # whether this pass already emitted trained text (before this `{{ }}`)


@dataclass
class Trace:
    name: str
    text: str
    emissions: list
    labels: str           # one `Label` value per character of `text`
    probe: Probe          # the conversation rendered (a probe or a prefix of one)
    prompt: bool          # add_generation_prompt


def _instrument(template: Template):
    """A fresh AST of the same source with every piece wrapped in `sft_emit(id, value)`, every for-loop body
    opened with `sft_enter(loop, item)` and every for-loop followed by `sft_leave(loop)` (so text after an
    inner loop over messages, e.g. gpt-oss's look-ahead, is not taken for the last message it saw); pieces
    are numbered in the same order as `Template`."""
    tree = template.env.parse(template.source)
    counter = iter(range(len(template.pieces)))
    loop_ids = {}

    def call(name, *args):
        return nodes.Call(nodes.Name(name, "load"), list(args), [], None, None)

    def walk(stmts):
        out = []
        for node in stmts:
            out.append(node)
            if isinstance(node, nodes.Output):
                new = []
                for child in node.nodes:
                    pid = next(counter)
                    if isinstance(child, nodes.TemplateData):
                        new.append(call("sft_emit", nodes.Const(pid), nodes.Const(child.data)))
                        continue
                    operands = template.exprs[pid]
                    if len(operands) == 1:
                        new.append(call("sft_emit", nodes.Const(pid), child))
                    else:
                        for _ in operands[1:]:
                            next(counter)
                        new.append(_wrap_chain(child, iter(p.id for p in operands), call))
                node.nodes = new
            elif isinstance(node, nodes.If):
                node.body = walk(node.body)
                for elif_ in node.elif_:
                    elif_.body = walk(elif_.body)
                node.else_ = walk(node.else_)
            elif isinstance(node, nodes.For):
                loop = loop_ids[id(node)] = len(loop_ids)
                node.body = walk(node.body)
                if isinstance(node.target, nodes.Name):
                    node.body.insert(0, nodes.Output([call("sft_enter", nodes.Const(loop),
                                                            nodes.Name(node.target.name, "load"))]))
                    out.append(nodes.Output([call("sft_leave", nodes.Const(loop))]))
                node.else_ = walk(node.else_)
        return out
    tree.body = walk(tree.body)
    return tree


def _wrap_chain(node, ids, call):
    if isinstance(node, nodes.Add):
        node.left = _wrap_chain(node.left, ids, call)
        node.right = _wrap_chain(node.right, ids, call)
        return node
    if isinstance(node, nodes.Concat):
        node.nodes = [_wrap_chain(n, ids, call) for n in node.nodes]
        return node
    return call("sft_emit", nodes.Const(next(ids)), node)


def _cases(probe: Probe):
    """(name, messages, add_generation_prompt): the renders training and inference make of a probe."""
    yield probe.name, probe.messages, False
    yield f"{probe.name}+prompt", probe.messages, True
    for i, m in enumerate(probe.messages):
        # A conversation cut right after a tool call has no turn end to find: some templates
        # keep the model's turn open for the tool's answer, so where the turn stops is unknowable there.
        if m.get("role") == "assistant" and i + 1 < len(probe.messages) and text_of(m.get("content")) \
                and not m.get("tool_calls"):
            yield f"{probe.name}[:{i + 1}]", probe.messages[: i + 1], False


def trace_all(template: Template, tokenizer, settings: list[dict]) -> tuple[list[Trace], list[str]]:
    from transformers.utils.chat_template_utils import _alias_reasoning_fields, _plain_template_data

    env = template.env
    code = env.compile(_instrument(template))
    traced = env.template_class.from_code(env, code, env.make_globals(None), None)
    kwargs = dict(tokenizer.special_tokens_map) if tokenizer is not None else {}
    # The end-of-turn text, from the first probe that shows it (a prefix ending in a tool call doesn't).
    eot = next((e for p in PROBES if (e := end_of_turn(template.source, usable_probe(template.source, p, with_special_tokens(
        kwargs)), with_special_tokens(kwargs)))), None)
    out, failed, first_error = [], [], None
    # The settings of the template's switches the markers must suit (lint checks each one).
    for setting, probe in ((setting, probe) for setting in settings for probe in VERIFICATION_PROBES):
        probe = replace(probe, template_kwargs={**setting, **probe.template_kwargs})
        probe = usable_probe(template.source, probe, with_special_tokens(kwargs))
        for name, messages, prompt in _cases(probe):
            if setting:
                name = f"{name} ({setting_label(setting, {})})"
            sub = replace(probe, messages=messages)
            try:
                expected = render_probe(template.source, sub, messages, prompt, kwargs)
            except TemplateRaised:
                continue  # the original refuses this conversation, the marked one must too (checked by lint)
            except InputError as err:
                if probe.training_shape:  # a shape only other renderers give: no allowance is needed
                    failed.append(name)  # the original can't render it either (e.g. no tool support): not ours
                    first_error = first_error or err
                continue
            emissions, stack, passes = [], [], []

            def enter(loop, item):
                while stack and stack[-1][0] == loop:
                    stack.pop()
                if isinstance(item, dict) and isinstance(item.get("role"), str):
                    stack.append((loop, item["role"], len(passes)))
                    passes.append(loop)
                return ""

            def leave(loop):
                while stack and stack[-1][0] == loop:
                    stack.pop()
                return ""

            def emit(pid, value, _e=emissions, _s=stack):
                text = str(value) if value is not None else "None"
                loop, role, iteration = _s[-1] if _s else (None, None, None)
                _e.append((pid, text, role, iteration, loop))
                return value

            variables = {**with_special_tokens(kwargs), **probe.template_kwargs}
            chat = _alias_reasoning_fields(_plain_template_data(messages if probe.keep_none
                                                                else normalize_messages(messages)))
            try:
                text = traced.render(messages=chat, tools=_plain_template_data(probe.tools), documents=None,
                                     add_generation_prompt=prompt, sft_emit=emit, sft_enter=enter, sft_leave=leave,
                                     **_plain_template_data(variables))
            except RenderLimit as err:  # the traced render has the same budget as any other (a template that
                raise RenderLimit(f"tracing probe {name}: {err}") from None  # loops only when traced stops too)
            except jinja2.TemplateError as err:
                raise MarkerError(f"tracing the template failed on probe {name}: {template_error_text(err)}") from None
            except Exception as err:  # noqa: BLE001 - whatever the template's code raised while traced
                raise InputError(f"the template failed while traced on probe {name}: "
                                 f"{template_error_text(err)}") from None
            pos, located = 0, []
            for pid, piece_text, role, iteration, loop in emissions:
                located.append(Emission(pid, pos, pos + len(piece_text), role, loop, iteration))
                pos += len(piece_text)
            if text != expected.text or "".join(e[1] for e in emissions) != text:
                raise MarkerError(f"the template's output could not be traced to its source on probe {name} "
                                  "(output from a filter/call block, or a non-string `+`)")
            labels = label_characters(template.source, sub, expected, eot, kwargs)
            _mark_started(located, labels, template.pieces)
            out.append(Trace(name, text, located, labels, sub, prompt))
    if not out and first_error:
        raise InputError(f"the template fails to render every probe conversation: {first_error}")
    return out, failed


def _mark_started(emissions: list[Emission], labels: str, pieces: list[Piece]) -> None:
    """Set `started` on each emission: its pass through the messages loop already emitted trained text.
    Operands of one `{{ }}` share the first operand's value, as a condition around the tag sees it."""
    trained, previous = set(), None
    for e in emissions:
        piece = pieces[e.piece]
        e.started = previous.started if piece.kind == "operand" and piece.index > 0 else e.iteration in trained
        if e.iteration is not None and Label.TRAINED in labels[e.start:e.end]:
            trained.add(e.iteration)
        previous = e
