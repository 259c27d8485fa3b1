"""Trace: render the probe corpus through an instrumented copy of the template, recording which piece of the
source emitted every output character, for which message of the conversation loop (step 1 of `markers`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import jinja2
from jinja2 import nodes
from jinja2.visitor import NodeTransformer

from ..lint import setting_label
from ..masks import RenderLimit, TemplateRaised, normalize_messages, template_error_text
from ..probes import PROBES, VERIFICATION_PROBES, Probe, text_of
from ..problems import InputError
from ..turns import end_of_turn, render_probe, usable_probe
from .errors import MarkerError
from .label import Label, label_characters
from .source import Piece, PieceKind, Template, with_special_tokens


@dataclass
class Emission:
    piece: int
    start: int
    end: int
    role: str | None  # role of the innermost message being looped over, if any
    loop: int | None  # id of that for-loop node
    iteration: int | None = None  # which pass through that loop
    started: bool = False  # whether this pass already emitted trained text (before this `{{ }}`)
    previous_role: str | None = None  # role of the previous pass's message; outside loops, of the last loop's last
    after_loop: int | None = None  # outside loops: the loop over messages that ended last
    has_content: bool = False  # whether this pass's message has a truthy `content` (as jinja tests it)


@dataclass
class Trace:
    name: str
    text: str
    emissions: list[Emission]
    labels: str  # one `Label` value per character of `text`
    probe: Probe  # the conversation rendered (a probe or a prefix of one)
    prompt: bool  # add_generation_prompt


class _Instrumenter(NodeTransformer):
    """Wraps every piece of a fresh AST of the template's source in `sft_emit(id, value)`, opens every for-loop
    body with `sft_enter(loop, item)` and follows every for-loop with `sft_leave(loop)` (so text after an inner
    loop over messages, e.g. gpt-oss's look-ahead, is not taken for the last message it saw). Only statement
    lists of `if` and `for` are entered, as `Template` enters them, so pieces are numbered in its order; other
    statements (macros, set/filter/call blocks) capture their output and stay as they are."""

    def __init__(self, template: Template):
        self.template = template
        self.piece_ids = iter(range(len(template.pieces)))
        self.loops = 0

    def generic_visit(self, node, *args, **kwargs):
        return node

    def visit_Template(self, node: nodes.Template) -> nodes.Template:
        return super().generic_visit(node)

    def visit_If(self, node: nodes.If) -> nodes.If:
        return super().generic_visit(node)

    def visit_For(self, node: nodes.For) -> list[nodes.Node]:
        loop = self.loops
        self.loops += 1
        super().generic_visit(node)
        if not isinstance(node.target, nodes.Name):
            return [node]
        node.body.insert(
            0, nodes.Output([_call("sft_enter", nodes.Const(loop), nodes.Name(node.target.name, "load"))])
        )
        return [node, nodes.Output([_call("sft_leave", nodes.Const(loop))])]

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        wrapped = []
        for child in node.nodes:
            piece_id = next(self.piece_ids)
            if isinstance(child, nodes.TemplateData):
                wrapped.append(_call("sft_emit", nodes.Const(piece_id), nodes.Const(child.data)))
                continue
            operands = self.template.exprs[piece_id]
            if len(operands) == 1:
                wrapped.append(_call("sft_emit", nodes.Const(piece_id), child))
            else:
                for _ in operands[1:]:
                    next(self.piece_ids)
                wrapped.append(_wrap_chain(child, iter(p.id for p in operands)))
        node.nodes = wrapped
        return node


def _instrument(template: Template) -> nodes.Template:
    """A fresh AST of the template's source with every piece and loop recorded (see `_Instrumenter`)."""
    return _Instrumenter(template).visit(template.env.parse(template.source))


def _call(name: str, *args: nodes.Expr) -> nodes.Call:
    return nodes.Call(nodes.Name(name, "load"), list(args), [], None, None)


def _wrap_chain(node: nodes.Expr, ids) -> nodes.Expr:
    if isinstance(node, nodes.Add):
        node.left = _wrap_chain(node.left, ids)
        node.right = _wrap_chain(node.right, ids)
        return node
    if isinstance(node, nodes.Concat):
        node.nodes = [_wrap_chain(n, ids) for n in node.nodes]
        return node
    return _call("sft_emit", nodes.Const(next(ids)), node)


def _cases(probe: Probe):
    """(name, messages, add_generation_prompt): the renders training and inference make of a probe."""
    yield probe.name, probe.messages, False
    yield f"{probe.name}+prompt", probe.messages, True
    for i, m in enumerate(probe.messages):
        # A conversation cut right after a tool call has no turn end to find: some templates
        # keep the model's turn open for the tool's answer, so where the turn stops is unknowable there.
        if (
            m.get("role") == "assistant"
            and i + 1 < len(probe.messages)
            and text_of(m.get("content"))
            and not m.get("tool_calls")
        ):
            yield f"{probe.name}[:{i + 1}]", probe.messages[: i + 1], False


def trace_all(template: Template, tokenizer, settings: list[dict]) -> tuple[list[Trace], list[str]]:
    """Every render lint checks (each probe of `VERIFICATION_PROBES` under each setting, with and without the
    generation prompt, cut after each assistant turn), traced and labelled; and the names of the probes the
    original template itself fails to render."""
    from transformers.utils.chat_template_utils import (
        _alias_reasoning_fields,
        _plain_template_data,
    )

    env = template.env
    code = env.compile(_instrument(template))
    traced = env.template_class.from_code(env, code, env.make_globals(None), None)
    kwargs = dict(tokenizer.special_tokens_map) if tokenizer is not None else {}
    # The end-of-turn text, from the first probe that shows it (a prefix ending in a tool call doesn't).
    special = with_special_tokens(kwargs)
    eot = next(
        (
            found
            for probe in PROBES
            if (found := end_of_turn(template.source, usable_probe(template.source, probe, special), special))
        ),
        None,
    )
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
            emissions, texts, stack, passes = [], [], [], []
            last_roles, ended = {}, [(None, None)]  # loop -> role of its latest pass; (loop, role) that ended last

            def enter(loop, item):
                while stack and stack[-1][0] == loop:
                    stack.pop()
                if isinstance(item, dict) and isinstance(item.get("role"), str):
                    stack.append((loop, item["role"], len(passes), last_roles.get(loop), bool(item.get("content"))))
                    passes.append(loop)
                    last_roles[loop] = item["role"]
                return ""

            def leave(loop):
                while stack and stack[-1][0] == loop:
                    stack.pop()
                if loop in last_roles:
                    ended[0] = (loop, last_roles.pop(loop))
                return ""

            def emit(piece_id, value):
                emitted = str(value) if value is not None else "None"
                loop, role, iteration, previous, content = (
                    stack[-1] if stack else (None, None, None, ended[0][1], False)
                )
                start = emissions[-1].end if emissions else 0
                emissions.append(
                    Emission(
                        piece_id,
                        start,
                        start + len(emitted),
                        role,
                        loop,
                        iteration,
                        previous_role=previous,
                        after_loop=None if stack else ended[0][0],
                        has_content=content,
                    )
                )
                texts.append(emitted)
                return value

            variables = {**with_special_tokens(kwargs), **probe.template_kwargs}
            chat = _alias_reasoning_fields(
                _plain_template_data(messages if probe.keep_none else normalize_messages(messages))
            )
            try:
                text = traced.render(
                    messages=chat,
                    tools=_plain_template_data(probe.tools),
                    documents=None,
                    add_generation_prompt=prompt,
                    sft_emit=emit,
                    sft_enter=enter,
                    sft_leave=leave,
                    **_plain_template_data(variables),
                )
            except RenderLimit as err:  # the traced render has the same budget as any other (a template that
                raise RenderLimit(f"tracing probe {name}: {err}") from None  # loops only when traced stops too)
            except jinja2.TemplateError as err:
                raise MarkerError(f"tracing the template failed on probe {name}: {template_error_text(err)}") from None
            except Exception as err:  # noqa: BLE001 - whatever the template's code raised while traced
                raise InputError(
                    f"the template failed while traced on probe {name}: {template_error_text(err)}"
                ) from None
            if text != expected.text or "".join(texts) != text:
                raise MarkerError(
                    f"the template's output could not be traced to its source on probe {name} "
                    "(output from a filter/call block, or a non-string `+`)"
                )
            labels = label_characters(template.source, sub, expected, eot, kwargs)
            _mark_started(emissions, labels, template.pieces)
            out.append(Trace(name, text, emissions, labels, sub, prompt))
    if not out and first_error:
        raise InputError(f"the template fails to render every probe conversation: {first_error}")
    return out, failed


def _mark_started(emissions: list[Emission], labels: str, pieces: list[Piece]) -> None:
    """Set `started` on each emission: its pass through the messages loop already emitted trained text.
    Operands of one `{{ }}` share the first operand's value, as a condition around the tag sees it."""
    trained, previous = set(), None
    for e in emissions:
        piece = pieces[e.piece]
        e.started = previous.started if piece.kind == PieceKind.OPERAND and piece.index > 0 else e.iteration in trained
        if e.iteration is not None and Label.TRAINED in labels[e.start : e.end]:
            trained.add(e.iteration)
        previous = e
