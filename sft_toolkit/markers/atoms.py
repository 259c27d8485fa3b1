"""The atoms `place` walks: each emitting piece or statement of a statement list (or part of one), with its
signature, the set of `Label`s it emits over all traced renders."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .label import Label
from .source import Piece, Statement


class AtomKind(str, Enum):
    PIECE = "piece"  # a whole piece
    CHARACTERS = "chars"  # part of a literal's text
    HEAD = "head"  # the untrained start of a split `{{ name }}`
    TAIL = "tail"  # its trained rest
    STATEMENT = "stmt"  # a whole statement
    RESOLVED = "done"  # a statement (or `{{ }}`) marked inside or under a condition
    ASSIGNMENT = "break"  # an assignment that emits nothing


TRAINED_ONLY = frozenset({Label.TRAINED})
MIXED = frozenset({Label.TRAINED, Label.UNTRAINED})
# Signatures of atoms that end a run of trained atoms without being labels: a statement marked inside (or under
# a condition), and an assignment (a `set` inside a generation block is not seen after it).
RESOLVED_INSIDE = frozenset({"resolved inside"})
ASSIGNMENT = frozenset({"assignment"})


@dataclass(frozen=True)
class Atom:
    kind: AtomKind
    item: Piece | Statement
    signature: frozenset
    start: int = 0  # chars: [start, end) of the literal's text
    end: int = 0
    landmark: str = ""  # head/tail: the text the head ends with
