"""What the mask guard hands on: the recipe to train with, the datasets, and each repair it made.

The guard never changes the recipe it is given. A repair (a raised max_length, bfd packing, a chat template with
generation markers) makes a new recipe, and `Guarded.recipe` is the one the report describes and the trainer
gets; `Repairs` records each change as a typed field and as the lines the guard says. Both `train.guard` (from
raw data) and `prepared.load_prepared` (from a dataset `prepare` saved) return a `Guarded`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from datasets import Dataset

    from .check_data import Report
    from .recipe import Recipe

T = TypeVar("T")


@dataclass(frozen=True)
class Change(Generic[T]):
    """A setting the guard changed: what the recipe said, and what is in force."""

    before: T
    after: T


@dataclass(frozen=True)
class Repairs:
    """The guard's changes (none under reject or warn), and everything it says, repairs and warnings alike."""

    max_length: Change[int] | None = None  # raised to keep every assistant token (within max_length_limit)
    packing_strategy: Change[str] | None = None  # to bfd, which neither cuts conversations nor orphans tokens
    chat_template_path: str | None = None  # a template with generation markers added, written to output_dir
    dropped_sequences: int = 0  # train sequences with zero trainable tokens, left out
    dropped_eval_sequences: int = 0  # eval sequences with zero trainable tokens (their loss would be NaN)
    notes: tuple[str, ...] = ()  # each repair with its effect in numbers, and each warning, in order


@dataclass(frozen=True)
class Guarded:
    """What the guard decided the run trains on."""

    report: Report  # check-data's accounting of `dataset` (and `eval_dataset`) as they are trained
    dataset: Dataset
    eval_dataset: Dataset | None  # None unless eval_strategy evaluates
    recipe: Recipe  # the recipe the datasets were built with: the input one, or a new one carrying the repairs
    repairs: Repairs
