"""Lint a chat template for assistant-only training: static rules on jinja2's AST, rendered rules on probes.

Static rules read the template without running it (jinja2's own parser, with a `generation` tag that
parses like transformers' and remembers where the block ends). Rendered rules run the template through
transformers' renderer on the probe corpus and compare what is trained with where each assistant turn
really is, as `turns.locate_turns` (shared with add-markers) finds it: without knowing the family,
`render(messages[:i], add_generation_prompt=True)` ends where the model starts writing turn i, so everything
the template emits from there up to the turn's end-of-turn text is the assistant's output; everything else must
stay untrained.

The rules (code, layer, severity, what each catches) are defined once, in `rules.RULES`; every finding here is
built from that registry, and docs/lint.md's rule table is rendered from it.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, replace

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension

from . import policy as control
from .masks import BoundedSandbox, Rendered, TemplateRaised, tokenize
from .probes import CONTROL_PROBES, TOOL_SHAPE_PROBES, VERIFICATION_PROBES, Probe
from .problems import ERROR, INFO, WARNING, Finding, InputError
from .rules import RULES
from .turns import NO_STOP, Turn, end_of_turn, first_difference, locate_turns, render_probe, usable_probe

ASSISTANT_ROLES = {"assistant", "model", "gpt", "bot"}
OTHER_ROLES = {"user", "system", "tool", "ipython", "human", "developer"}
# Literal text that ends a turn in the families we know; used by the static S005 rule only (the rendered
# R003 rule finds each template's own end-of-turn text by rendering).
EOT_LITERAL = re.compile(r"^\s*(<\|(?:im_end|eot_id|end|endoftext|eom_id)\|>|<end_of_turn>|</s>|<turn\|>)")


@dataclass(frozen=True)
class LintResult:
    template: str
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not any(f.severity == ERROR for f in self.findings)

    def to_json(self) -> dict:
        return {"template": self.template, "ok": self.ok, "findings": [f.to_json() for f in self.findings]}


PRAGMA = re.compile(
    r"sft-toolkit:\s*allow\s+([A-Z]\d{3}(?:\s*,\s*[A-Z]\d{3})*)"
    r"(?:\s+when\s+(\w+=[^\s,;()]+(?:[,;]\s*\w+=[^\s,;()]+)*))?\s*(?:\((.*?)\))?"
)


def lint(
    source: str, name: str, *, tokenizer=None, reference: str | None = None, template_kwargs: dict | None = None
) -> LintResult:
    """All rules on one template. `reference` is the original inference template to compare bytes with.

    The probes render with `template_kwargs` (what a dataset's `chat_template_kwargs` or the caller passes)
    and, besides, with each of the template's own switches (`template_switches`) set both ways."""
    findings = static_findings(source)
    # Rendering is pointless when the template can't parse, or has no blocks (every turn would be "untrained").
    if not any(f.rule in ("S001", "S002", "S003") for f in findings):
        rendered, eot = rendered_findings(
            source, tokenizer=tokenizer, reference=reference, settings=settings_for(source, template_kwargs)
        )
        if eot and not any(f.rule == "R003" and f.severity == ERROR for f in rendered):
            findings = static_findings(source, trained_eot=eot)  # S005 knows how the template ends a turn now
        findings += rendered
    findings = _apply_allowances(source, findings)
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    findings.sort(key=lambda f: (order[f.severity], f.line or 0, f.rule))
    return LintResult(template=name, findings=findings)


def _apply_allowances(source: str, findings: list[Finding]) -> list[Finding]:
    """A template may accept a rule it breaks by design, with a reason, in a comment:
    `{# sft-toolkit: allow R004 (Mistral moves the system prompt to the last user turn) #}`, or only under one
    setting of its switches: `{# sft-toolkit: allow R002 when enable_thinking=false (reason) #}` (then only the
    findings seen under that setting alone). Such findings stay visible as info, with the reason; nothing is
    silently dropped."""
    allowed = {}
    for comment in re.findall(r"\{#(.*?)#\}", source, flags=re.S):
        for m in PRAGMA.finditer(comment):
            when = re.sub(r"\s+", " ", m.group(2)) if m.group(2) else None
            for rule in re.split(r"\s*,\s*", m.group(1)):
                allowed[(rule, when)] = (m.group(3) or "no reason given").strip()

    def reason(f: Finding) -> str | None:
        if (f.rule, None) in allowed:
            return allowed[(f.rule, None)]
        return next(
            (
                why
                for (rule, when), why in allowed.items()
                if rule == f.rule and when and f.message.endswith(f" with {when}]")
            ),
            None,
        )

    return [
        Finding(f.rule, INFO, f"allowed by the template ({why}): {f.message}", f.line)
        if f.severity != INFO and (why := reason(f)) is not None
        else f
        for f in findings
    ]


# --------------------------------------------------------------------------------------------- static


class _GenerationTag(Extension):
    """Parses `{% generation %}` the way transformers' AssistantTracker does, and records the closing line."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=False)
        end_lineno = parser.stream.current.lineno
        next(parser.stream)
        block = nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)
        block.end_lineno = end_lineno
        return block


_PARSER = jinja2.Environment(
    extensions=[_GenerationTag, "jinja2.ext.loopcontrols"], trim_blocks=True, lstrip_blocks=True
)
_SANDBOXED_PARSER = BoundedSandbox(
    extensions=[_GenerationTag, "jinja2.ext.loopcontrols"], trim_blocks=True, lstrip_blocks=True
)


def generation_blocks(source: str) -> list[nodes.CallBlock]:
    """The `{% generation %}` blocks of a template, in source order (raises jinja2.TemplateSyntaxError)."""
    return list(_PARSER.parse(source).find_all(nodes.CallBlock))


def static_findings(source: str, trained_eot: str | None = None) -> list[Finding]:
    """`trained_eot`: the end-of-turn text rendering found (trained wherever R003 looked), if known."""
    try:
        tree = _PARSER.parse(source)
    except jinja2.TemplateSyntaxError as err:
        col = _error_column(source, err)
        if "generation" in err.message:
            return [
                RULES["S003"].finding(
                    f"unbalanced generation block at {err.lineno}:{col}: {err.message} "
                    "Every {% generation %} needs exactly one {% endgeneration %}.",
                    err.lineno,
                )
            ]
        return [RULES["S001"].finding(f"syntax error at {err.lineno}:{col}: {err.message}", err.lineno)]

    blocks = list(tree.find_all(nodes.CallBlock))
    if not blocks:
        return [
            RULES["S002"].finding(
                "no {% generation %} block: assistant_only_loss would train on nothing. "
                "Wrap each assistant message's output and its end-of-turn token in "
                "{% generation %}...{% endgeneration %} (or run `sft-toolkit add-markers`).",
            )
        ]
    findings = []
    for block in blocks:
        for inner in block.find_all(nodes.CallBlock):
            findings.append(
                RULES["S003"].finding(
                    f"generation block at line {inner.lineno} is nested inside the "
                    f"one at line {block.lineno}; transformers records both spans. Remove the inner one.",
                    inner.lineno,
                )
            )
    for block, conditions in _blocks_with_conditions(tree):
        findings += _role_finding(block, conditions)
    findings += _eot_after_block_findings(tree, trained_eot)
    return findings


def _error_column(source: str, err: jinja2.TemplateSyntaxError) -> int:
    """jinja2 reports only the line; point at the tag it names, else at the line's first statement."""
    lines = source.splitlines()
    if not err.lineno or err.lineno > len(lines):
        return 1
    line = lines[err.lineno - 1]
    named = re.search(r"'(\w+)'", err.message)
    if named and (m := re.search(r"\{[%{]-?\s*" + re.escape(named.group(1)), line)):
        return m.start() + 1
    m = re.search(r"\{[%{#]", line)
    return (m.start() + 1) if m else 1


def _blocks_with_conditions(tree) -> list[tuple[nodes.CallBlock, list[tuple[nodes.Node, bool]]]]:
    """Each generation block with the `if` tests on its path: (test, True) in a body, (test, False) in an else."""
    found = []

    def walk(node, conditions):
        if isinstance(node, nodes.CallBlock):
            found.append((node, conditions))
        if isinstance(node, nodes.If):
            walk(node.test, conditions)
            for child in node.body:
                walk(child, conditions + [(node.test, True)])
            negated = conditions + [(node.test, False)]
            for elif_ in node.elif_:
                walk(elif_, negated)
            for child in node.else_:
                walk(child, negated)
            return
        for child in node.iter_child_nodes():
            walk(child, conditions)

    walk(tree, [])
    return found


def _roles_in(test: nodes.Node) -> set[str]:
    return {c.value for c in test.find_all(nodes.Const) if isinstance(c.value, str)} & (ASSISTANT_ROLES | OTHER_ROLES)


def _effective(test: nodes.Node, positive: bool) -> bool | None:
    """Whether a branch selects the roles its test names: `role != 'tool'` and `not role == 'tool'` select every
    role but those; an `or` with a clause that isn't about the role (`... or 'tool_calls' in message`)
    selects nothing definite (None)."""
    if isinstance(test, nodes.Not):
        return _effective(test.node, not positive)
    if isinstance(test, nodes.Compare) and len(test.ops) == 1 and test.ops[0].op in ("ne", "notin"):
        return not positive
    if isinstance(test, nodes.Or) and positive and not all(_roles_in(side) for side in (test.left, test.right)):
        return None
    return positive


def _role_finding(block: nodes.CallBlock, conditions) -> list[Finding]:
    for test, positive in reversed(conditions):
        positive = _effective(test, positive)
        if positive is None:
            continue
        roles = _roles_in(test)
        if positive and roles & ASSISTANT_ROLES:
            return []
        if positive and roles & OTHER_ROLES and not roles & ASSISTANT_ROLES:
            role = sorted(roles & OTHER_ROLES)[0]
            return [
                RULES["S004"].finding(
                    f"generation block at line {block.lineno} sits under a condition on role "
                    f"'{role}': it would train {role} text. Move it into the assistant branch.",
                    block.lineno,
                )
            ]
    return [
        RULES["S004"].finding(
            f"generation block at line {block.lineno} is not inside an `if` on the "
            "assistant role; check it only wraps assistant output.",
            block.lineno,
            conditional=True,
        )
    ]


def _eot_after_block_findings(tree, trained_eot: str | None = None) -> list[Finding]:
    """An end-of-turn literal emitted right after `{% endgeneration %}` is left untrained: the model never learns
    to stop. When rendering showed that the template ends a conversation's last turn with other text, and no
    R003 error, the literal may be one the model never writes (gpt-oss ends a final answer with `<|return|>`,
    and history shows it as `<|end|>`): then it is a warning, which still names the literal."""
    findings = []
    for parent in tree.find_all((nodes.Template, nodes.If, nodes.For, nodes.CallBlock, nodes.Macro)):
        for field in ("body", "else_"):
            children = getattr(parent, field, None) or []
            for block, following in zip(children, children[1:]):
                if not (isinstance(block, nodes.CallBlock) and (eot := _leading_eot(following))):
                    continue
                message = (
                    f"end-of-turn {eot!r} on line {following.lineno} is emitted after {{% endgeneration %}} "
                    f"(line {block.end_lineno}): it is not trained"
                )
                if trained_eot and trained_eot != eot:
                    findings.append(
                        RULES["S005"].finding(
                            f"{message}. The template ends a conversation's "
                            f"last turn with {trained_eot!r}, which is trained; leave {eot!r} out only "
                            "if the model never writes it there.",
                            following.lineno,
                            conditional=True,
                        )
                    )
                else:
                    findings.append(
                        RULES["S005"].finding(
                            f"{message}, so the model never learns to stop. Move it inside the block.",
                            following.lineno,
                        )
                    )
    return findings


def _leading_eot(node: nodes.Node) -> str | None:
    if not isinstance(node, nodes.Output) or not node.nodes:
        return None
    first = node.nodes[0]
    text = first.data if isinstance(first, nodes.TemplateData) else None
    if isinstance(first, nodes.Const) and isinstance(first.value, str):
        text = first.value
    if isinstance(first, nodes.Name) and first.name == "eos_token":
        return "{{ eos_token }}"
    if isinstance(first, nodes.Add):  # '<|im_end|>' + '\n'
        left = first.left
        while isinstance(left, nodes.Add):
            left = left.left
        if isinstance(left, nodes.Const) and isinstance(left.value, str):
            text = left.value
    m = EOT_LITERAL.match(text or "")
    return m.group(1) if m else None


# ------------------------------------------------------------------------------------------- switches

# What transformers and TRL give every template (plus jinja's own globals): never a template's own switch.
STANDARD_VARIABLES = {
    "messages",
    "tools",
    "documents",
    "add_generation_prompt",
    # transformers' own argument (it cuts the text after the final message), never passed to the template:
    # a template that reads it sees it undefined under TRL.
    "continue_final_message",
    "raise_exception",
    "strftime_now",
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
    "range",
    "dict",
    "lipsum",
    "cycler",
    "joiner",
    "namespace",
    "loop",
}
# Tests that only ask what a value is (`x is defined`, `x is false`): a switch may be asked them.
_BOOLEAN_TESTS = {"defined", "undefined", "true", "false", "boolean", "none", "sameas"}
MAX_SWITCHES = 8


def template_switches(source: str) -> list[str]:
    """The boolean variables a template reads from its context (`enable_thinking`, `tools_in_user_message`),
    in order of first use: names no one passes by standard (`STANDARD_VARIABLES`) that the template uses only
    as a truth value (`if x`, `not x`, `x is false`, `x == true`, `x | default(false)`) and sets, if at all,
    only to a boolean or from itself. [] when the template does not parse."""
    from jinja2 import meta

    try:
        # find_undeclared_variables compiles the tree, and compiling folds constants (`10 ** 10 ** 10`): parsed
        # in the bounded sandbox, whose intercepted operators and filters are never folded at compile time.
        tree = _SANDBOXED_PARSER.parse(source)
    except jinja2.TemplateSyntaxError:
        return []
    candidates = meta.find_undeclared_variables(tree) - STANDARD_VARIABLES
    used, disqualified = [], set()

    def visit(node, parent, grandparent):
        if isinstance(node, nodes.Assign) and isinstance(node.target, nodes.Name) and node.target.name in candidates:
            name = node.target.name
            if not _boolean_value(node.node, name):
                disqualified.add(name)  # set to something that is not a truth value
            elif name not in used and not any(n.name == name for n in node.node.find_all(nodes.Name)):
                disqualified.add(name)  # set before it is read: the template's own variable, not the caller's
        elif isinstance(node, nodes.Name) and node.name in candidates:
            if node.ctx == "load":
                used.append(node.name)
                if not _boolean_use(node, parent, grandparent):
                    disqualified.add(node.name)
            elif not isinstance(parent, nodes.Assign):
                disqualified.add(node.name)  # a loop variable or a macro argument
        for child in node.iter_child_nodes():
            visit(child, node, parent)

    visit(tree, None, None)
    return [name for name in dict.fromkeys(used) if name not in disqualified][:MAX_SWITCHES]


def _boolean_use(node, parent, grandparent) -> bool:
    if isinstance(parent, nodes.CondExpr) and isinstance(grandparent, nodes.Assign):
        # `{% set x = x if x is defined else true %}`: a default for the caller's value
        return parent.test is node or getattr(grandparent.target, "name", None) == node.name
    if isinstance(parent, (nodes.If, nodes.CondExpr)):
        return parent.test is node
    if isinstance(parent, (nodes.Not, nodes.And, nodes.Or)):
        return True
    if isinstance(parent, nodes.Test):
        return parent.node is node and parent.name in _BOOLEAN_TESTS
    if isinstance(parent, nodes.Filter):
        return (
            parent.node is node
            and parent.name == "default"
            and all(isinstance(a, nodes.Const) and isinstance(a.value, bool) for a in parent.args)
        )
    if isinstance(parent, nodes.Compare):  # x == true
        return all(isinstance(op.expr, nodes.Const) and isinstance(op.expr.value, bool) for op in parent.ops)
    if isinstance(parent, nodes.Operand) and isinstance(grandparent, nodes.Compare):  # true == x
        return isinstance(grandparent.expr, nodes.Const) and isinstance(grandparent.expr.value, bool)
    return False


def _boolean_value(value, name: str) -> bool:
    """`{% set x = true %}`, or `{% set x = x | default(false) %}`."""
    if isinstance(value, nodes.Const):
        return isinstance(value.value, bool)
    return any(n.name == name for n in value.find_all(nodes.Name))


def settings_for(source: str, template_kwargs: dict | None = None) -> list[dict]:
    """The variable settings lint renders its probes with: `template_kwargs` as given, then each switch the
    template reads (and `template_kwargs` doesn't set) true and false."""
    base = dict(template_kwargs or {})
    return [base] + [
        {**base, name: value} for name in template_switches(source) if name not in base for value in (True, False)
    ]


def setting_label(setting: dict, base: dict) -> str:
    """How a finding names the setting that shows it: the switches it sets beyond the caller's kwargs."""
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in setting.items() if k not in base or base[k] != v)


# ------------------------------------------------------------------------------------------- rendered


def rendered_findings(
    source: str, *, tokenizer=None, reference: str | None = None, settings: list[dict] | None = None
) -> tuple[list[Finding], str | None]:
    """Run the probe corpus under each variable setting (`settings_for`; default: none); one finding per
    distinct problem, naming the probes (and turns) that show it, and the settings when not all of them do.
    Also returns the template's end-of-turn text when the probes show it."""
    kwargs = dict(tokenizer.special_tokens_map) if tokenizer is not None else {}
    settings = settings or [{}]
    line = _single_block_line(source)
    seen: dict[Finding, list[tuple[str, str]]] = defaultdict(list)
    examples: dict[Finding, str] = {}
    label = ""

    def add(finding: Finding, where: str, example: str | None = None):
        seen[finding].append((where, label))
        if example is not None:
            examples.setdefault(finding, example)

    eot, rendered_any, writes_no_eot = None, False, False
    for setting in settings:
        label = setting_label(setting, settings[0])
        for probe in [*VERIFICATION_PROBES, *CONTROL_PROBES]:
            controls, shape = probe in CONTROL_PROBES, probe in TOOL_SHAPE_PROBES
            probe = replace(probe, template_kwargs={**setting, **probe.template_kwargs})
            probe = usable_probe(source, probe, kwargs)
            try:
                full = render_probe(source, probe, probe.messages, False, kwargs)
            except TemplateRaised as err:
                add(
                    RULES["I001"].finding(f"the template rejects this probe conversation ({err}); skipped"), probe.name
                )
                continue
            except InputError as err:
                if shape:  # a shape some datasets write, worth a warning where training gives it
                    if probe.training_shape:
                        message = (
                            f"{err}; rows written this way fail with this template (check-data "
                            "reports them as template_error)"
                        )
                        add(RULES["R007"].finding(message, conditional=True), probe.name)
                else:
                    add(RULES["R007"].finding(f"{err}"), probe.name)
                continue
            rendered_any = True
            found = end_of_turn(source, probe, kwargs)
            eot, writes_no_eot = eot or found, writes_no_eot or found == ""
            try:
                full, off = _apply_control(probe.messages, full)
            except control.MappingError as err:
                message = (
                    "per-message training control (train: false, train_roles, train_turns) can't "
                    f"be used with this template: {err}. Write one {{% generation %}} block per assistant message."
                )
                add(RULES["R008"].finding(message, line, conditional=True), probe.name)
                continue
            for rule, severity, message, turn, example in _check_probe(source, probe, full, eot, kwargs, off):
                add(
                    Finding(rule, severity, message, line),
                    f"{probe.name}#{turn}" if turn is not None else probe.name,
                    example=example,
                )
            if reference is not None:
                for message in _reference_diffs(source, reference, probe, kwargs):
                    add(RULES["R005"].finding(message), probe.name)
            if tokenizer is not None and not controls:  # control probes add no new token boundaries
                for message in _token_boundaries(source, probe, tokenizer):
                    add(RULES["R006"].finding(message, line), probe.name)

    findings = []
    if writes_no_eot and not eot:
        findings.append(
            RULES["R003"].finding(
                f"{NO_STOP} on every probe, so no end-of-turn token is trained and "
                "the model never learns to stop. If the next message's role tag ends a turn (GLM-4's "
                "`<|user|>`), emit it inside the assistant's {% generation %} block to train it, or "
                "accept it with `{# sft-toolkit: allow R003 (why the model stops) #}`.",
            )
        )
    labels = [setting_label(setting, settings[0]) for setting in settings]
    for finding, where in seen.items():
        example = f" e.g. {examples[finding]}." if finding in examples else ""
        findings.append(replace(finding, message=f"{finding.message}{example} [seen in {_summarize(where, labels)}]"))
    if not rendered_any and not any(f.rule == "R007" for f in findings):
        findings.append(
            RULES["R007"].finding(
                "the template rejected every probe conversation; nothing could be "
                "checked. Does it accept a plain user/assistant exchange?",
            )
        )
    return findings, eot or None


def _summarize(where: list[tuple[str, str]], labels: list[str] | None = None, limit: int = 4) -> str:
    """The probes that show a finding; and the settings, when some of the settings rendered don't show it."""
    unique = list(dict.fromkeys(probe for probe, _ in where))
    shown = ", ".join(unique[:limit])
    more = len(unique) - limit
    out = f"probe {shown}" + (f" and {more} more" if more > 0 else "")
    showing = list(dict.fromkeys(label for _, label in where))
    if labels and len(labels) > 1 and set(showing) != set(labels):
        out += " with " + "; ".join(label or "the template's defaults" for label in showing)
    return out


def _apply_control(messages: list[dict], full: Rendered) -> tuple[Rendered, frozenset[int]]:
    """The render as training sees it under the messages' own train fields, and the switched-off turns."""
    if not control.has_flags(messages):
        return full, frozenset()
    policy = control.TurnPolicy()
    off = frozenset(i for i, on in control.selected(messages, policy).items() if not on)
    return Rendered(full.text, control.kept_spans(messages, full, policy)), off


def _single_block_line(source: str) -> int | None:
    blocks = generation_blocks(source)
    return blocks[0].lineno if len(blocks) == 1 else None


def _check_probe(
    source, probe: Probe, full: Rendered, eot, kwargs, off: frozenset[int] = frozenset()
) -> list[tuple[str, str, str, int | None, str | None]]:
    """`off`: assistant messages switched off by per-message control, which must stay untrained. Each problem is
    (code, severity, message, turn index or None, example or None)."""
    out = []
    turns, mismatches = locate_turns(source, probe, full, eot, kwargs)
    out += [_problem("R004", m, turn, example) for m, turn, example in mismatches]
    text, trained = full.text, full.trained_chars()
    for turn in turns:
        s, e = turn.region
        if turn.index in off:
            if any(trained[s:e]):
                out.append(
                    _problem(
                        "R008",
                        "an assistant turn switched off (train: false) is still trained: the "
                        "template's generation blocks are not one per assistant message, in order.",
                        turn.index,
                    )
                )
            continue
        if not any(trained[s:e]):
            out.append(
                _problem(
                    "R001",
                    "an assistant turn has no trained characters, so it is not learned. Is the "
                    "generation block in a branch this turn doesn't take (e.g. only the last turn)?",
                    turn.index,
                )
            )
            continue
        for a, b, kind in turn.required:
            if all(trained[a:b]):
                continue
            if kind == "eot":
                out.append(
                    _problem(
                        "R003",
                        f"the end-of-turn {eot!r} after an assistant turn is not trained, so the "
                        "model never learns to stop. Put it inside {% generation %}.",
                        turn.index,
                    )
                )
            else:
                untrained = "".join(c for c, t in zip(text[a:b], trained[a:b]) if not t)
                out.append(
                    _problem(
                        "R001",
                        "an assistant turn's content is only partly trained.",
                        turn.index,
                        f"untrained {untrained[:40]!r}",
                    )
                )
    allowed = [False] * len(text)
    for turn in turns:
        allowed[turn.region[0] : turn.region[1]] = [True] * (turn.region[1] - turn.region[0])
        if turn.gap:
            allowed[turn.gap[0] : turn.gap[1]] = [False] * (turn.gap[1] - turn.gap[0])
    for start, end in _runs([t and not a for t, a in zip(trained, allowed)]):
        what, turn = _describe(text, start, end, turns, probe)
        out.append(
            _problem(
                "R002",
                f"trained text outside assistant output: {what}. Only assistant output and "
                "its end-of-turn may be inside {% generation %}.",
                turn,
                repr(text[start:end][:60]),
            )
        )
    return out


def _problem(code: str, message: str, turn: int | None, example: str | None = None) -> tuple:
    return code, RULES[code].severity, message, turn, example


def _describe(text: str, start: int, end: int, turns: list[Turn], probe: Probe) -> tuple[str, int | None]:
    """Say what untrainable text a trained run covers: another message, a role header, or template text."""
    for message in probe.messages:
        content = message.get("content")
        if message.get("role") != "assistant" and isinstance(content, str) and content:
            pos = text.find(content)
            if pos >= 0 and pos < end and start < pos + len(content):
                return f"{message['role']} message text", None
    for turn in turns:
        if turn.header and turn.header[0] <= start < turn.header[1]:
            header = text[turn.header[0] : turn.header[1]]
            return f"part of the role header {header!r} that the generation prompt writes", turn.index
        if turn.region[1] == start:
            return "text after the assistant turn's end-of-turn", turn.index
    return "template text between turns", None


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _reference_diffs(source: str, reference: str, probe: Probe, kwargs) -> list[str]:
    diffs = []
    cases = [(probe.messages, False), (probe.messages, True)]
    cases += [(probe.messages[:i], True) for i, m in enumerate(probe.messages) if m.get("role") == "assistant" and i]
    for messages, gen in cases:
        try:
            ours = render_probe(source, probe, messages, gen, kwargs).text
        except (TemplateRaised, InputError) as err:
            ours = f"<raised: {err}>"
        try:
            theirs = render_probe(reference, probe, messages, gen, kwargs).text
        except (TemplateRaised, InputError) as err:
            theirs = f"<raised: {err}>"
        if ours != theirs:
            at = first_difference(ours, theirs)
            line = theirs.count("\n", 0, at) + 1
            diffs.append(
                f"renders differently from the reference ({len(messages)} messages, add_generation_prompt="
                f"{gen}) at output line {line}: ours {ours[at : at + 40]!r}, reference {theirs[at : at + 40]!r}"
            )
    return diffs


def _token_boundaries(source: str, probe: Probe, tokenizer) -> list[str]:
    try:
        tm = tokenize(
            tokenizer, probe.messages, template=source, tools=probe.tools, template_kwargs=probe.template_kwargs
        )
    except (TemplateRaised, InputError):
        return []
    out = []
    for start, end in tm.spans:
        for (a, b), token_id in zip(tm.offsets, tm.ids):
            token = tm.text[a:b]
            if a < start < b:
                out.append(
                    f"mask starts inside token {token!r} (id {token_id}): transformers trains the whole "
                    f"token, so {tm.text[a:start]!r} before the generation block is trained too"
                )
            if a < end < b:
                out.append(
                    f"mask ends inside token {token!r} (id {token_id}): transformers trains the whole "
                    f"token, so {tm.text[end:b]!r} after the generation block is trained too. Usually the "
                    "end-of-turn text is not a single token in this vocabulary"
                )
    return out
