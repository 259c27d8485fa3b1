"""Lint's rules, defined once: code, layer, severity and what each catches.

Every lint finding is built from this registry (`RULES[code].finding(...)`), so a rule's severity lives here
and nowhere else, and the rule table in docs/lint.md (and the README's, where it has one) is rendered from it
(`rules_table`; tests/test_rules.py checks both and regenerates them). Codes are stable: other tools match on
them. Adding a rule: one entry here, one check in `lint.py`, one fixture `tests/fixtures/templates/CODE_*.jinja`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .problems import ERROR, INFO, WARNING, Finding


class Layer(Enum):
    """Where a rule looks: the template's jinja2 AST without running it, or its renders of the probes."""

    STATIC = "static"
    RENDERED = "rendered"


@dataclass(frozen=True)
class Rule:
    """One lint rule. `conditional_severity`, where set, is the severity of the rule's findings that matter
    only in some cases (a block that may wrap only assistant output, a tool-call shape only some datasets
    write); the check that builds a finding says which case it is (`conditional=True`)."""

    code: str
    name: str
    layer: Layer
    severity: str
    catches: str
    conditional_severity: str | None = None

    def severity_of(self, conditional: bool = False) -> str:
        if not conditional:
            return self.severity
        if self.conditional_severity is None:
            raise ValueError(f"lint rule {self.code} has no conditional severity")
        return self.conditional_severity

    def finding(self, message: str, line: int | None = None, *, conditional: bool = False) -> Finding:
        return Finding(self.code, self.severity_of(conditional), message, line)

    @property
    def severities(self) -> tuple[str, ...]:
        return (self.severity,) + ((self.conditional_severity,) if self.conditional_severity else ())


_ALL = [
    Rule("S001", "syntax-error", Layer.STATIC, ERROR, "Jinja syntax error (line:column)"),
    Rule("S002", "no-generation-block", Layer.STATIC, ERROR, "no `{% generation %}` block"),
    Rule("S003", "generation-unbalanced", Layer.STATIC, ERROR, "unbalanced or nested generation blocks"),
    Rule(
        "S004",
        "generation-not-assistant",
        Layer.STATIC,
        ERROR,
        "generation block under a non-assistant role condition / not under any role condition",
        conditional_severity=WARNING,
    ),
    Rule(
        "S005",
        "eot-outside-generation",
        Layer.STATIC,
        ERROR,
        "end-of-turn literal emitted right after `{% endgeneration %}` (a warning when rendering shows the turn's "
        "own end-of-turn, another text, trained: gpt-oss's `<|end|>` after a final answer in history)",
        conditional_severity=WARNING,
    ),
    Rule(
        "R001",
        "assistant-turn-untrained",
        Layer.RENDERED,
        ERROR,
        "an assistant turn with nothing (or only part of its content) trained",
    ),
    Rule(
        "R002",
        "trained-outside-assistant",
        Layer.RENDERED,
        ERROR,
        "trained text outside assistant output: user/system/tool text, the generation prompt's role header, text "
        "after the end-of-turn (text the prompt pre-fills after the role header may be trained or not)",
    ),
    Rule(
        "R003",
        "eot-not-trained",
        Layer.RENDERED,
        ERROR,
        "end-of-turn not trained (the model never learns to stop), also when the template writes nothing after an "
        "assistant's content on every probe, so no end-of-turn can be trained (glm4: allow it with a reason, "
        "`{# sft-toolkit: allow R003 (…) #}`, as add-markers does)",
    ),
    Rule(
        "R004",
        "generation-prompt-mismatch",
        Layer.RENDERED,
        ERROR,
        "`render(prefix, add_generation_prompt=True)` is not a prefix of the full render (train/inference mismatch)",
    ),
    Rule("R005", "reference-mismatch", Layer.RENDERED, ERROR, "byte difference from `--reference`"),
    Rule(
        "R006",
        "mask-inside-token",
        Layer.RENDERED,
        WARNING,
        "with `--tokenizer`: a mask boundary inside a token (names the token and the extra text trained)",
    ),
    Rule(
        "R007",
        "render-failed",
        Layer.RENDERED,
        ERROR,
        "the template fails to render a probe (a warning for a tool-call shape only some datasets write, "
        "e.g. `content: null` beside tool calls)",
        conditional_severity=WARNING,
    ),
    Rule(
        "R008",
        "message-control",
        Layer.RENDERED,
        ERROR,
        "per-message training control: a turn switched off with `train: false` is still trained (error), or it "
        "can't be used because the generation blocks are not one per assistant message (warning)",
        conditional_severity=WARNING,
    ),
    Rule(
        "I001",
        "probe-rejected",
        Layer.RENDERED,
        INFO,
        "the template rejects a probe (`raise_exception`); skipped",
    ),
]

RULES: dict[str, Rule] = {rule.code: rule for rule in _ALL}

TABLE_HEADER = "| code | layer | severity | catches |\n|---|---|---|---|"


def rules_table() -> str:
    """The markdown rule table docs/lint.md (and the README) show, one row per rule in registry order."""
    rows = [
        f"| {rule.code} | {rule.layer.value} | {' / '.join(rule.severities)} | {rule.catches} |"
        for rule in RULES.values()
    ]
    return "\n".join([TABLE_HEADER, *rows])
