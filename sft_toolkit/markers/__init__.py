"""Add `{% generation %}` markers to an inference chat template, and prove the result before handing it out.

Hand-placing markers in a 200-line template is where masks go wrong, and TRL only swaps in a training
template when a model's template is byte-identical to one of the few it stores. Here the template is
*run* to find where its assistant output comes from, then markers are placed at those places in the
source, and the result must pass the same checks as a hand-written template:

1. Trace. jinja2's own parser gives the AST; every piece that emits text (a `{{ }}` expression, each
   operand of a `+`/`~` chain in it, a run of literal text) is wrapped in a recording call, and the
   instrumented tree is compiled with transformers' own environment (same filters, globals, sandbox).
   Rendering the probe corpus then says, for every output character, which piece emitted it and for
   which message of the conversation loop.
2. Label. `turns.locate_turns` (lint's turn finder) says where each assistant turn is in the text (from the end of the
   generation prompt's role header to its end-of-turn): those characters must be trained, all others
   must not. Whitespace after the end-of-turn may go either way (we leave it untrained, as the bundled
   templates do); so may text the generation prompt pre-fills and a tool-call turn's closing markup,
   which are trained where that gives the markers a fixed place.
3. Place. Walking the template's statement lists, maximal runs of pieces that only emit trained text
   get one generation block each; pieces that emit both are split (an expression at its `+`, literal
   text between characters, a printed variable after its role header) or, when the same code renders
   every role (`'<|start_header_id|>' + role + ... + content`), duplicated under
   `{% if message.role == 'assistant' %}` so only the assistant copy is marked; when the same assistant
   code is the prompt's in one place and the model's in another (a second message header inside one
   turn), it is duplicated under a flag saying whether the turn has begun (see `Placer`); when the previous
   message's role or whether the message has text tells the two apart (`conditions`), under that. Whitespace
   control is preserved by moving each tag's `-` to the inserted tag and using `+` where jinja's
   trim_blocks/lstrip_blocks would otherwise eat text.
4. Verify. The result must render byte-identically to the input on every probe (with and without the
   generation prompt, every prefix; every tool-call shape in `probes.TOOL_SHAPE_PROBES`), train every
   labelled character and, checked apart from the labels, every assistant content, reasoning and tool-call
   name and argument the render shows, and pass lint (`verify_placement`). Nothing is returned otherwise:
   `MarkerError` says which construct defeated the placement and on which line.

Modules: `tags` and `source` (the source scanned into tags and emitting pieces, matched to jinja2's AST),
`trace` (step 1), `label` (2), `place` with `atoms`, `boundaries` and `conditions` (3), `verify` (4), `errors`
(`MarkerError`); this module runs them in turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..lint import lint, settings_for
from ..masks import GENERATION_MARKER
from ..problems import ERROR
from ..turns import NO_STOP
from .errors import MarkerError
from .label import Label
from .place import Placer
from .source import Template, strip_markers
from .trace import trace_all
from .verify import Refusal, check_traces, verify_placement

__all__ = ["MarkerError", "Refusal", "Result", "add_markers", "has_markers", "strip_markers", "verify_placement"]


@dataclass(frozen=True)
class Result:
    """A verified marked template and what placing its markers took."""

    source: str
    blocks: int  # generation blocks inserted
    role_conditions: int  # shared role code duplicated under an assistant condition
    relaxed_whitespace: bool  # some whitespace inside an assistant turn had to stay untrained


def has_markers(source: str) -> bool:
    return bool(GENERATION_MARKER.search(source))


def add_markers(source: str, *, tokenizer=None) -> Result:
    """The template with generation markers added, verified; raises MarkerError (or InputError) otherwise.

    A template that already has markers is returned as it is when lint passes; otherwise its markers are
    taken out and placed again (the result must still render exactly like the input).
    """
    original = source
    if has_markers(source):
        if lint(source, "input", tokenizer=tokenizer).ok:
            return Result(source, 0, 0, False)
        source = strip_markers(source)
    template = Template.parse(source)
    # Markers placed for the template's defaults, when lint passes them under every setting of its switches
    # (but for header-level R002/R004 findings of one setting, allowed by name and setting); else markers that
    # suit every setting; else, where no place suits them all, the defaults' markers with the other settings'
    # R001 findings allowed too (see _inherit_allowances).
    settings = settings_for(source)
    attempts = [([{}], False)] + ([(settings, False), ([{}], True)] if len(settings) > 1 else [])
    errors, traced = [], {}
    for tried, defaults_only in attempts:
        if len(tried) not in traced:
            try:
                traced[len(tried)] = trace_all(template, tokenizer, tried)
            except MarkerError as err:  # under another setting: why the defaults' markers failed says more
                if not errors:
                    raise
                errors.append(err)
                continue
        traces, failed = traced[len(tried)]
        if not any(Label.TRAINED in trace.labels for trace in traces):
            raise MarkerError("no probe conversation rendered an assistant turn; is this a chat template?")
        # Plain first; then leaving whitespace inside turns untrained; then with the turn-has-begun flag.
        for relaxed, flags in ((False, False), (True, False), (False, True), (True, True)):
            try:
                placed = Placer(template, traces, relaxed, flags).place()
            except MarkerError as err:
                errors.append(err)
                continue
            marked = _inherit_allowances(placed.source, failed, tokenizer, defaults_only=defaults_only)
            problems = check_traces(original, marked, traces, tokenizer, relaxed, template)
            if not problems:
                return Result(marked, placed.blocks, placed.role_conditions, relaxed)
            errors.append(
                MarkerError(
                    "the marked template failed verification: " + "; ".join(f.message for f in problems[:3]),
                    next((f.line for f in problems if f.line), None),
                )
            )
    if str(errors[0]) != str(errors[1]):
        raise MarkerError(
            f"{errors[0]} (and with whitespace inside turns left untrained: {errors[1]})",
            errors[0].line or errors[1].line,
        )
    raise errors[0]


def _inherit_allowances(marked: str, failed: list[str], tokenizer, defaults_only: bool = False) -> str:
    """Findings that belong to the original's text, which the marked template reproduces byte for byte, are
    allowed with that reason in a comment (lint keeps showing them, as info) instead of failing the
    conversion: R004 (its generation prompt is not how it renders a past assistant turn) and R007 for
    probes the original itself fails to render (e.g. a template without tool support); R002/R004 seen only
    under one setting of the template's switches, for that setting (with `enable_thinking=false` glm4's
    generation prompt writes the role header's newline that starts a turn by default: a byte-identical
    conversion places one block boundary for both), and R001 too when the markers were placed for the
    template's defaults only (`defaults_only`: no place suits every setting; check-data's content coverage
    still checks each row rendered with its own settings); and R003 when the
    original writes nothing after an assistant's content (glm4: the next message's role tag ends the turn, and
    a byte-identical conversion can't train a tag that belongs to the next message)."""
    errors = [f for f in lint(marked, "marked", tokenizer=tokenizer).findings if f.severity == ERROR]
    rules = {f.rule for f in errors}
    reasons = []
    setting_rules = ("R001", "R002", "R004") if defaults_only else ("R002", "R004")
    for label in dict.fromkeys(
        m.group(1)
        for f in errors
        if f.rule in setting_rules and (m := re.search(r" with (\w+=[^\s,;()]+(?:; \w+=[^\s,;()]+)*)\]$", f.message))
    ):
        rules_there = ", ".join(sorted({f.rule for f in errors if f.message.endswith(f" with {label}]")}))
        why = (
            "markers placed for the template's defaults: with {label} the same code writes assistant output "
            "and text the model is given, so no place suits both"
            if defaults_only
            else "with {label} its generation prompt ends elsewhere than its turns begin by default, and a "
            "byte-identical conversion marks one place"
        )
        reasons.append(f"{rules_there} when {label} (inherited from the original template: {why.format(label=label)})")
    if any(f.rule == "R003" and f.message.startswith(NO_STOP) for f in errors):
        reasons.append(
            "R003 (inherited from the original template: it writes nothing after an assistant's content, "
            "the next message's role tag ends the turn, so no stop token can be trained)"
        )
    if "R004" in rules:
        reasons.append(
            "R004 (inherited from the original template: its generation prompt differs from how it "
            "renders a past assistant turn)"
        )
    if "R007" in rules and failed:
        reasons.append(
            f"R007 (inherited from the original template: it fails to render the probes "
            f"{', '.join(sorted({n.split(' (')[0].split('[')[0].split('+')[0] for n in failed}))})"
        )
    return "".join(f"{{# sft-toolkit: allow {r} #}}" for r in reasons) + marked
