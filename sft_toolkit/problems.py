"""One shape for everything that can be wrong: lint findings, data-check reasons, guard decisions, bad input.

Core modules never print and never exit. They return `Finding`s (something about the user's template,
data or recipe that they should know) or raise `InputError` (the input can't be used at all). The CLI
alone turns these into output formats and exit codes, so every command speaks the same language.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ERROR = "error"
WARNING = "warning"
INFO = "info"


@dataclass(frozen=True)
class Finding:
    """A rule that fired: `rule` is a stable code other tools may match on; `message` says what to change."""

    rule: str
    severity: str
    message: str
    line: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


class InputError(Exception):
    """Input the toolkit cannot use (unreadable file, malformed row, bad recipe key).

    The message must name the file / row / field and say what to do; the CLI prints it as one line and
    exits with code 2, never with a traceback.
    """


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity == ERROR for f in findings)
