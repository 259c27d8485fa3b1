"""The error add-markers raises when a template can't be given verified markers."""

from __future__ import annotations


class MarkerError(Exception):
    """The template could not be given verified markers; `line` points at the construct that defeated it."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.args[0]}"
