"""check-data: run the trainer's preprocessing on a recipe's dataset and account for every trainable token.

The verdict is strict on purpose: a row that ends with nothing to train, a packed sequence with nothing
to train, or an assistant token trained without the conversation it answers all fail the check, because
each of them is compute spent on nothing or on the wrong thing, and none of them shows up in a loss curve
until it is too late.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import coverage, preprocess
from .policy import recipe_policy
from .problems import InputError

BATCH = 1000


@dataclass
class Report:
    rows: int = 0
    tokens: int = 0
    trainable_tokens_before: int = 0  # after tokenization, before truncation / packing
    trainable_tokens: int = 0  # what the trainer will actually train on
    zero_mask_rows: list[dict] = field(default_factory=list)  # {"index", "reason"}; empty answers included
    # {"index", "reason", "message"} (the row's first problem), "reasons" (every kind it has) and "problems" (every
    # {"reason", "message"}): coverage.py
    coverage_problem_rows: list[dict] = field(default_factory=list)
    # Rows whose trained characters could not be told (a Python tokenizer whose decoded prefixes are not the row's
    # text, a row that renders differently when rendered again): their content coverage is not checked, and they
    # are listed here instead of passing as checked.
    coverage_unchecked_rows: list[int] = field(default_factory=list)
    dropped_rows: int = 0  # rows TRL filters out (no packing)
    truncated_assistant_tokens: int = 0
    orphaned_assistant_tokens: int = 0
    orphaned_rows: list[int] = field(default_factory=list)
    sequences: int = 0
    zero_trainable_sequences: int = 0
    steps: int = 0
    zero_trainable_steps: int = 0
    trl_would_abort: bool = False  # plain TRL raises on the first row without assistant tokens
    max_length_to_keep_all: int = 0  # the smallest max_length that loses no assistant token
    max_zero_rows: int = 0
    settings: dict = field(default_factory=dict)
    # A datasets: mixture: per source, {"source", "rows", "trainable_tokens", "zero_mask_rows"} (empty otherwise).
    sources: list[dict] = field(default_factory=list)
    # The eval split (eval_strategy not "no"): the same accounting, `index` counted within the eval split.
    eval: Report | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. `datasets` given with `dataset_name` (ignored)

    @property
    def ok(self) -> bool:
        return (
            len(self.zero_mask_rows) <= self.max_zero_rows
            and self.zero_trainable_sequences == 0
            and self.zero_trainable_steps == 0
            and self.orphaned_assistant_tokens == 0
            and self.rows > 0
            and (self.eval is None or self.eval.ok)
            and not self.coverage_problem_rows
        )

    def problems(self) -> list[str]:
        """Each reason the check fails, with numbers and the change that fixes it."""
        out = []
        if self.rows == 0:
            out.append("the dataset is empty")
        if len(self.zero_mask_rows) > self.max_zero_rows:
            out.append(
                f"{len(self.zero_mask_rows)} rows end with zero trainable tokens (allowed: {self.max_zero_rows}); "
                "fix or remove them, or raise max_zero_rows (recipe key; check-data --max-zero-rows)"
            )
        if self.coverage_problem_rows:
            out.append(_coverage_problem_text(self.coverage_problem_rows))
        if self.zero_trainable_sequences and not self.settings.get("packing", True):
            out.append(
                f"{self.zero_trainable_sequences} of {self.sequences} sequences have zero trainable tokens (wasted "
                "compute): without max_length the trainer drops no row, so the rows with nothing to train are "
                "trained as they are; fix or remove them, or set max_length (such rows are then dropped)"
            )
        elif self.zero_trainable_sequences:
            out.append(
                f"{self.zero_trainable_sequences} of {self.sequences} packed sequences have zero trainable tokens "
                "(wasted compute); use packing_strategy: bfd and drop zero-trainable rows, or raise max_length"
            )
        if self.zero_trainable_steps:
            out.append(f"{self.zero_trainable_steps} of {self.steps} optimizer steps would see zero trainable tokens")
        if self.orphaned_assistant_tokens:
            out.append(
                f"{self.orphaned_assistant_tokens} assistant tokens in {len(self.orphaned_rows)} rows would be "
                "trained without the conversation before them (split by packing); use packing_strategy: bfd"
            )
        if self.eval is not None:
            out += [f"eval split: {problem}" for problem in self.eval.problems()]
        return out

    def to_json(self) -> dict:
        data = {"ok": self.ok, **asdict(self), "problems": self.problems()}
        data["eval"] = self.eval.to_json() if self.eval is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> Report:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        if isinstance(values.get("eval"), dict):
            values["eval"] = cls.from_json(values["eval"])
        return cls(**values)


def check_data(recipe, *, world_size: int = 1, keep_provenance: bool = False) -> tuple[Report, object]:
    """Return the report and the dataset the trainer would train on (input_ids, labels[, seq_lengths]).

    keep_provenance: also keep src_rows / src_pos (each token's source row and position in it), for a
    prepared dataset that other commands trace back to the user's rows.
    The report covers the eval split too when the recipe evaluates (see `check_splits`).
    """
    report, train, _ = check_splits(recipe, world_size=world_size, keep_provenance=keep_provenance)
    return report, train


def check_splits(recipe, *, world_size: int = 1, keep_provenance: bool = False) -> tuple[Report, object, object]:
    """The report, the train dataset and the eval dataset (None when eval_strategy is "no") as the trainer gets
    them. The eval split goes through the same preprocessing (with `eval_packing` where set, as TRL packs it)
    and the same accounting; its report is `report.eval`, and its problems fail the report like the train's."""
    from .data import load_splits

    script, mixture = recipe.script, getattr(recipe, "mixture", None)
    handbook = getattr(recipe, "handbook_mixture", None)
    if not script.dataset_name and not (mixture is not None and mixture.datasets) and handbook is None:
        raise InputError(
            f"{recipe.source}: dataset_name is not set; this recipe trains from prepared: "
            f"{recipe.toolkit.prepared}, whose accounting is in its manifest.json"
        )
    tokenizer = preprocess.load_tokenizer_for(recipe)
    try:
        splits = load_splits(recipe)
    except InputError as err:
        key = (
            "datasets"
            if mixture is not None and mixture.datasets
            else "dataset_mixture"
            if handbook is not None
            else "dataset_name"
        )
        raise InputError(f"{recipe.source}: {key}: {err}") from None
    sft = recipe.sft
    report, final, trainable = _account(
        recipe,
        tokenizer,
        splits.train,
        splits.train_label,
        packing=sft.packing,
        batch=(sft.per_device_train_batch_size, sft.gradient_accumulation_steps),
        world_size=world_size,
        keep_provenance=keep_provenance,
    )
    report.sources = _per_source(report, trainable, splits.sources, splits.train_source)
    report.warnings = list(splits.notes)
    eval_final = None
    if splits.eval is not None:
        packing = sft.packing if sft.eval_packing is None else sft.eval_packing
        report.eval, eval_final, trainable = _account(
            recipe,
            tokenizer,
            splits.eval,
            splits.eval_label,
            packing=packing,
            batch=(sft.per_device_eval_batch_size, 1),
            world_size=world_size,
            keep_provenance=False,
        )
        report.eval.sources = _per_source(report.eval, trainable, splits.sources, splits.eval_source)
    return report, final, eval_final


def _account(
    recipe,
    tokenizer,
    raw,
    label: str,
    *,
    packing: bool,
    batch: tuple[int, int],
    world_size: int,
    keep_provenance: bool,
) -> tuple[Report, object, np.ndarray]:
    """One split through the trainer's preprocessing, with every row and token accounted for; also each row's
    trainable tokens."""
    sft = recipe.sft
    # Plain text and pre-tokenized rows never meet the chat template (a base model may not have one).
    template = preprocess.training_template(tokenizer, sft) if preprocess.renders_template(raw) else None
    # The eval split's settings keep the train keys' names (the same report keys), with the eval batch in them.
    settings = {
        **_settings(sft, world_size),
        "packing": packing,
        "per_device_train_batch_size": batch[0],
        "gradient_accumulation_steps": batch[1],
    }
    report = Report(max_zero_rows=recipe.toolkit.max_zero_rows, settings=settings)
    try:  # errors about rows name the dataset they are in
        tokenized = preprocess.tokenize(
            raw, tokenizer, template, sft, role_map=recipe.toolkit.role_map, policy=recipe_policy(recipe)
        )
        per_row = _row_stats(tokenized, report)
        _coverage_rows(tokenized, report)
        _return_free_heap()  # what tokenizing freed, before truncation or packing maps the tokens (the peak)
    except InputError as err:
        raise InputError(f"{label}: {err}") from None
    if report.rows == 0:
        raise InputError(f"{label}: the dataset is empty (no rows); give at least one conversation")
    if preprocess.is_pretokenized(raw.column_names):
        report.trl_would_abort = False  # TRL checks no mask of pre-tokenized rows: it trains them as they are
    if packing:
        # bfd cuts every row to its first max_length tokens and packs it whole: its accounting needs no token's
        # provenance (only a prepared dataset keeps the source rows, `preprocess.provenance_columns`)
        whole_rows = sft.packing_strategy == "bfd"
        if whole_rows:
            _bfd_rows(tokenized, sft.max_length, per_row, report)
            if keep_provenance:  # cut and tagged in one table; the uncut one goes before packing reads it
                tokenized = preprocess.cut_for_bfd(tokenized, sft)
        trained = preprocess.pack(tokenized, sft, provenance=keep_provenance or not whole_rows)
        del tokenized  # its memory-mapped pages, read by packing, go before the packed ones are read
        if whole_rows:
            _bfd_sequences(trained, report)
        else:
            _packed_stats(trained, per_row, report)
        final = trained
    else:
        if sft.max_length is not None:  # the columns the trainer and `prepare` keep, tagged as they are cut
            tokenized = tokenized.select_columns(["input_ids", "labels", "src_row"])
            tokenized = preprocess.truncate(tokenized, sft, provenance=keep_provenance)
        elif keep_provenance:
            tokenized = preprocess.add_provenance(tokenized, sft)
        _truncated_stats(tokenized, per_row, report)
        if sft.max_length is not None:
            final = preprocess.drop_fully_masked(tokenized, sft)
        else:
            final = tokenized
    _zero_rows(per_row, report)
    keep = ("input_ids", "labels", "seq_lengths") + (preprocess.PROVENANCE if keep_provenance else ())
    final = final.select_columns([c for c in keep if c in final.column_names])
    if sft.shuffle_dataset:
        final = final.shuffle(seed=sft.seed)
    _steps(final, batch[0] * batch[1] * world_size, report)
    return report, final, per_row.after


def _per_source(report: Report, trainable: np.ndarray, sources: list[str], origin) -> list[dict]:
    """A mixture's rows, trainable tokens and zero-mask rows per source (empty for one dataset)."""
    if not sources or origin is None:
        return []
    zero = np.zeros(len(sources), dtype=np.int64)
    for row in report.zero_mask_rows:
        zero[origin[row["index"]]] += 1
    return [
        {
            "source": source,
            "rows": int((origin == i).sum()),
            "trainable_tokens": int(trainable[origin == i].sum()),
            "zero_mask_rows": int(zero[i]),
        }
        for i, source in enumerate(sources)
    ]


def _settings(sft, world_size) -> dict:
    keys = (
        "assistant_only_loss",
        "max_length",
        "truncation_mode",
        "packing",
        "packing_strategy",
        "padding_free",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
    )
    return {**{k: getattr(sft, k) for k in keys}, "world_size": world_size}


@dataclass
class _Rows:
    """Per-row numbers, indexed by the row's position in the dataset as the user gave it."""

    before: np.ndarray
    after: np.ndarray
    reasons: dict[int, str]


def _batches(dataset, columns):
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=BATCH):
        yield table if isinstance(table, pa.Table) else pa.Table.from_pydict(table)


def _row_stats(tokenized, report: Report) -> _Rows:
    before, reasons, problems, tokens = [], {}, [], 0
    for table in _batches(tokenized, ["src_row", "n_trainable", "span", "reason", "problem", "input_ids"]):
        rows = table["src_row"].to_numpy()
        report.max_length_to_keep_all = max(report.max_length_to_keep_all, int(pc.max(table["span"]).as_py() or 0))
        before.append(table["n_trainable"].to_numpy())
        tokens += int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)
        for row, reason, problem in zip(rows, table["reason"].to_pylist(), table["problem"].to_pylist()):
            if reason:
                reasons[int(row)] = reason
            if problem:
                problems.append((int(row), problem))
    if problems:
        shown = "; ".join(f"row {r}: {p}" for r, p in problems[:5])
        more = f" (and {len(problems) - 5} more rows)" if len(problems) > 5 else ""
        raise InputError(f"malformed rows (counted from 0) — {shown}{more}; fix or remove these rows")
    report.rows = sum(len(b) for b in before)
    report.tokens = tokens
    before = np.concatenate(before) if before else np.zeros(0, dtype=np.int64)
    report.trainable_tokens_before = int(before.sum())
    report.trl_would_abort = bool(report.settings["assistant_only_loss"] and (before == 0).any())
    return _Rows(before=before, after=before.copy(), reasons=reasons)


def _coverage_rows(tokenized, report: Report) -> None:
    """Rows whose mask misses the assistant's text or trains another message's (sft_toolkit/coverage.py)."""
    columns = tokenized.column_names or list(tokenized.features or {})  # a streamed dataset may know neither
    if "coverage_reason" not in columns:
        return  # plain text and pre-tokenized rows: no messages to hold the mask against
    if "coverage_unchecked" in columns:  # rows whose coverage has no verdict (coverage.columns)
        for table in _batches(tokenized, ["src_row", "coverage_unchecked"]):
            unchecked = table.filter(pc.equal(table["coverage_unchecked"], 1))
            report.coverage_unchecked_rows += [int(r) for r in unchecked["src_row"].to_pylist()]
    names = ["src_row", "coverage_reason", "coverage_message"]
    names += [c for c in ("coverage_problems",) if c in columns]  # every problem of the row (coverage.columns)
    for table in _batches(tokenized, names):
        reasons = table["coverage_reason"]
        flagged = pc.not_equal(reasons, "")
        if not pc.any(flagged).as_py():
            continue
        table = table.filter(flagged)
        every = table["coverage_problems"].to_pylist() if "coverage_problems" in names else [""] * len(table)
        for row, reason, message, found in zip(
            *(table[c].to_pylist() for c in ("src_row", "coverage_reason", "coverage_message")), every
        ):
            problems = coverage.problems_from(found) or [coverage.CoverageProblem(reason, int(message))]
            report.coverage_problem_rows.append(
                {
                    "index": int(row),
                    "reason": reason,
                    "message": int(message),
                    "reasons": list(dict.fromkeys(p.reason for p in problems)),
                    "problems": [{"reason": p.reason, "message": p.message} for p in problems],
                }
            )


COVERAGE_KINDS = {
    coverage.ASSISTANT_CONTENT_UNTRAINED: "leave assistant text untrained",
    coverage.NON_ASSISTANT_TEXT_TRAINED: "train user/system/tool text",
    coverage.PROMPT_TEXT_TRAINED: "train prompt text",
    coverage.GENERATION_PROMPT_TRAINED: "train the generation prompt",
    coverage.SWITCHED_OFF_TURN_TRAINED: "train a switched-off turn",
}


def row_coverage_problems(row: dict) -> list[dict]:
    """Every {reason, message} of a `coverage_problem_rows` entry (a report written before `problems` existed
    has the first one only)."""
    return row.get("problems") or [{"reason": row["reason"], "message": row["message"]}]


def _coverage_problem_text(rows: list[dict]) -> str:
    counts = {kind: 0 for kind in COVERAGE_KINDS}
    for row in rows:  # a row counts once under each kind of problem it has
        for kind in dict.fromkeys(p["reason"] for p in row_coverage_problems(row)):
            counts[kind] = counts.get(kind, 0) + 1
    parts = [f"{n} {COVERAGE_KINDS.get(kind, kind)}" for kind, n in counts.items() if n]
    return (
        f"{len(rows)} rows train the wrong text ({', '.join(parts)}); lint the template and check these rows "
        "with `sft-toolkit show DATASET --row N`"
    )


def _truncated_stats(tokenized, per_row: _Rows, report: Report) -> None:
    """Without packing: trainable tokens kept per row; TRL drops rows left with none."""
    if report.settings["max_length"] is None:  # nothing truncates, and TRL drops no row: each row is a sequence
        report.trainable_tokens = report.trainable_tokens_before
        report.sequences = report.rows
        report.zero_trainable_sequences = int((per_row.before == 0).sum())
        return
    kept = []
    for table in _batches(tokenized, ["labels"]):
        flags = pc.not_equal(pc.list_flatten(table["labels"]), -100)
        kept.append(_segment_sums(flags, table["labels"]))
    per_row.after = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    report.trainable_tokens = int(per_row.after.sum())
    report.truncated_assistant_tokens = int((per_row.before - per_row.after).sum())
    report.dropped_rows = int((per_row.after == 0).sum())
    report.sequences = report.rows - report.dropped_rows


def _segment_sums(flags: pa.Array, lists: pa.ChunkedArray) -> np.ndarray:
    """Sum a flat boolean array over the list boundaries of `lists`."""
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    values = np.asarray(flags.to_numpy(zero_copy_only=False), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    running = np.concatenate([[0], np.cumsum(values)])
    return running[offsets[1:]] - running[offsets[:-1]]


def _packed_stats(packed, per_row: _Rows, report: Report) -> None:
    after = np.zeros(len(per_row.before), dtype=np.int64)
    orphaned = np.zeros(len(per_row.before), dtype=np.int64)
    columns = ["labels", "src_rows", "src_pos"] + (["seq_lengths"] if "seq_lengths" in packed.column_names else [])
    for table in _batches(packed, columns):
        labels = table["labels"]
        trainable = pc.not_equal(pc.list_flatten(labels), -100).to_numpy(zero_copy_only=False)
        rows = pc.list_flatten(table["src_rows"]).to_numpy(zero_copy_only=False)
        pos = pc.list_flatten(table["src_pos"]).to_numpy(zero_copy_only=False)
        per_seq = _segment_sums(pc.not_equal(pc.list_flatten(labels), -100), labels)
        report.sequences += len(per_seq)
        report.zero_trainable_sequences += int((per_seq == 0).sum())
        np.add.at(after, rows[trainable], 1)
        starts = _document_starts(table, rows)
        segment = np.cumsum(starts) - 1
        orphan_segment = pos[starts] > 0  # the document starts mid-conversation: its context is elsewhere
        orphan_token = orphan_segment[segment] & trainable
        np.add.at(orphaned, rows[orphan_token], 1)
    per_row.after = after
    report.trainable_tokens = int(after.sum())
    report.truncated_assistant_tokens = int((per_row.before - after).sum())
    report.orphaned_assistant_tokens = int(orphaned.sum())
    report.orphaned_rows = [int(r) for r in np.flatnonzero(orphaned)]


def _bfd_rows(tokenized, max_length: int, per_row: _Rows, report: Report) -> None:
    """bfd packing, accounted without provenance columns: TRL's bfd cuts each row to its first `max_length`
    tokens and packs the cut whole, so a row keeps the trainable tokens of its cut and no document starts
    mid-row (nothing orphaned)."""
    after = np.zeros(len(per_row.before), dtype=np.int64)
    for table in _batches(tokenized, ["src_row", "labels"]):
        cut = pc.list_slice(table["labels"], 0, max_length)
        after[table["src_row"].to_numpy()] = _segment_sums(pc.not_equal(pc.list_flatten(cut), -100), cut)
    per_row.after = after
    report.trainable_tokens = int(after.sum())
    report.truncated_assistant_tokens = int((per_row.before - after).sum())


def _bfd_sequences(packed, report: Report) -> None:
    """The packed sequences, and those with nothing to train, counted from the packed labels."""
    for table in _batches(packed, ["labels"]):
        labels = table["labels"]
        per_seq = _segment_sums(pc.not_equal(pc.list_flatten(labels), -100), labels)
        report.sequences += len(per_seq)
        report.zero_trainable_sequences += int((per_seq == 0).sum())


def _document_starts(table: pa.Table, rows: np.ndarray) -> np.ndarray:
    """True where a token starts a document: a packed sequence's start, a seq_lengths boundary, a new row."""
    n = len(rows)
    starts = np.zeros(n, dtype=bool)
    lengths = pc.list_value_length(table["labels"]).to_numpy(zero_copy_only=False)
    seq_offsets = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    starts[seq_offsets[seq_offsets < n]] = True
    if n:
        starts[1:] |= rows[1:] != rows[:-1]
    if "seq_lengths" in table.column_names:
        doc_lengths = pc.list_flatten(table["seq_lengths"]).to_numpy(zero_copy_only=False)
        doc_offsets = np.concatenate([[0], np.cumsum(doc_lengths)])[:-1]
        starts[doc_offsets[doc_offsets < n]] = True
    return starts


def _zero_rows(per_row: _Rows, report: Report) -> None:
    flagged = np.zeros(len(per_row.after), dtype=bool)
    flagged[list(per_row.reasons)] = True
    for row in np.flatnonzero((per_row.after == 0) | flagged):
        row = int(row)
        reason = per_row.reasons.get(row) or (
            preprocess.PAST_MAX_LENGTH if per_row.before[row] > 0 else preprocess.TEMPLATE_MARKS_NOTHING
        )
        report.zero_mask_rows.append({"index": row, "reason": reason})


def _steps(final, per_step: int, report: Report) -> None:
    """Optimizer steps in dataset order (a step takes batch x accumulation x ranks sequences)."""
    zero_flags = []
    for table in _batches(final, ["labels"]):
        labels = table["labels"]
        zero_flags.append(_segment_sums(pc.not_equal(pc.list_flatten(labels), -100), labels) == 0)
    flags = np.concatenate(zero_flags) if zero_flags else np.zeros(0, dtype=bool)
    report.steps = math.ceil(len(flags) / per_step) if per_step else 0
    report.zero_trainable_steps = sum(bool(flags[i : i + per_step].all()) for i in range(0, len(flags), per_step))


REASON_HELP = {
    preprocess.NO_ASSISTANT_TURN: "the conversation has no assistant message: add the answer or drop the row",
    preprocess.EMPTY_ASSISTANT_CONTENT: "every assistant message is empty: only the end-of-turn would be trained",
    preprocess.TEMPLATE_MARKS_NOTHING: "the chat template marks nothing in this row: lint the template",
    preprocess.PAST_MAX_LENGTH: "all assistant tokens lie past max_length: raise max_length or shorten the prompt",
    preprocess.TEMPLATE_ERROR: "the chat template refused this row: fix the row (e.g. role order) or the template",
    preprocess.ALL_TURNS_SWITCHED_OFF: "every assistant turn is switched off (train: false / weight: 0, train_roles, "
    "train_turns): mark one turn to train or drop the row",
    preprocess.MASK_MARKS_NOTHING: "the row's labels / assistant_masks mark no token: fix its mask or drop the row",
    preprocess.EMPTY_COMPLETION: "the completion is empty: only the end-of-turn would be trained; give the "
    "completion or drop the row",
    preprocess.ROW_TOO_LARGE: "the row is not tokenized (more text than preprocess.MAX_ROW_CHARS): split the "
    "conversation or drop the row",
    coverage.ASSISTANT_CONTENT_UNTRAINED: "part of this assistant message's text (content or tool calls) is not "
    "trained, or only markup is: lint the template; for content parts, check "
    "the template renders them; a row whose chat_template_kwargs hold truncation / max_length has its tokens cut "
    "there: remove them (the recipe's max_length truncates with a count)",
    coverage.NON_ASSISTANT_TEXT_TRAINED: "text of this user/system/tool message is trained: the template's "
    "{% generation %} block covers it (lint the template), or it is in a completion, which completion_only_loss "
    "trains whole (set assistant_only_loss: true, or move it into the prompt)",
    coverage.PROMPT_TEXT_TRAINED: "text of this prompt message is trained: the completion starts where the prompt "
    "rendered alone (with the generation prompt) stops matching prompt + completion, which is inside the prompt "
    "(a template that renders the prompt differently when a completion follows, or tokens merged across the "
    "boundary): make the template render the prompt the same way, or end the prompt on a token boundary",
    coverage.GENERATION_PROMPT_TRAINED: "the markup this prompt ends with at inference (its end of turn, the "
    "generation prompt) is trained in front of the completion: the template ends the prompt differently when "
    "rendered alone; make it render the prompt the same way in both cases",
    coverage.SWITCHED_OFF_TURN_TRAINED: "this assistant message is switched off (train: false / weight: 0, "
    "train_roles, train_turns) but the final labels still train its text: a token it shares with a trained "
    "neighbour (messages written back to back), or a mask that ignores the policy; put a separator between "
    "the messages in the template, or switch the neighbour off too",
}


def reason_help(reason: str) -> str:
    return REASON_HELP.get(reason.split(":")[0], "")


def to_markdown(report: Report, title: str) -> str:
    """The human-readable report `--report` writes beside the JSON."""
    verdict = "PASS: fit to train" if report.ok else "FAIL: not fit to train"
    s = report.settings
    lines = [
        f"# check-data: {title}",
        "",
        f"**{verdict}**",
        "",
        f"Settings: max_length={s.get('max_length')}, truncation_mode={s.get('truncation_mode')}, "
        f"packing={s.get('packing')} ({s.get('packing_strategy')}), batch={s.get('per_device_train_batch_size')} "
        f"x accumulation {s.get('gradient_accumulation_steps')} x ranks {s.get('world_size')}",
        "",
        "| | |",
        "|---|---|",
        f"| rows | {report.rows} |",
        f"| tokens | {report.tokens} |",
        f"| trainable tokens before truncation/packing | {report.trainable_tokens_before} |",
        f"| trainable tokens the trainer sees | {report.trainable_tokens} |",
        f"| rows with zero trainable tokens | {len(report.zero_mask_rows)} (allowed {report.max_zero_rows}) |",
        f"| rows that train the wrong text (content coverage) | {len(report.coverage_problem_rows)} |",
        f"| rows whose content coverage could not be checked | {len(report.coverage_unchecked_rows)} |",
        f"| rows TRL would drop silently | {report.dropped_rows} |",
        f"| assistant tokens lost to truncation | {report.truncated_assistant_tokens} |",
        f"| assistant tokens trained without their context | {report.orphaned_assistant_tokens} |",
        f"| sequences (packed or not) | {report.sequences} |",
        f"| sequences with zero trainable tokens | {report.zero_trainable_sequences} |",
        f"| optimizer steps (dataset order) with zero trainable tokens | {report.zero_trainable_steps} of {report.steps} |",
        f"| plain TRL would abort (a row without assistant tokens) | {'yes' if report.trl_would_abort else 'no'} |",
        "",
    ]
    if report.problems():
        lines += ["## Problems", ""] + [f"- {p}" for p in report.problems()] + [""]
    if report.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
    if report.zero_mask_rows:
        lines += ["## Rows with nothing to train", "", "| row | reason | what to do |", "|---|---|---|"]
        lines += [f"| {r['index']} | {r['reason']} | {reason_help(r['reason'])} |" for r in report.zero_mask_rows]
        lines.append("")
    if report.coverage_problem_rows:
        lines += [
            "## Rows that train the wrong text",
            "",
            "| row | message | reason | what to do |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['index']} | {p['message']} | {p['reason']} | {reason_help(p['reason'])} |"
            for r in report.coverage_problem_rows
            for p in row_coverage_problems(r)
        ]
        lines.append("")
    if report.orphaned_rows:
        lines += ["## Rows split by packing", "", ", ".join(map(str, report.orphaned_rows)), ""]
    if report.sources:
        lines += [
            "## Rows per source",
            "",
            "| source | rows | trainable tokens | zero-mask rows |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {s['source']} | {s['rows']} | {s['trainable_tokens']} | {s['zero_mask_rows']} |"
            for s in report.sources
        ]
        lines.append("")
    if report.eval is not None:  # the same tables one heading level down; row numbers count within the eval split
        lines += [
            "#" + line if line.startswith("#") else line
            for line in to_markdown(report.eval, f"eval split of {title}").splitlines()
        ]
    return "\n".join(lines)


def _return_free_heap() -> None:
    """Hand the heap that tokenizing freed back to the system.

    glibc keeps freed memory in its arenas (one per thread that allocated: the tokenizer's Rust threads and the
    batches' Python and Arrow objects) instead of returning it, so after the tokenize map the process holds
    ~100-150 MiB of free heap, and the peak comes later, when truncation or packing maps the tokens on top of it:
    measured with `benchmarks/check_data.py`, prepare with bfd at 20k rows peaked at 1040 MiB, 898 MiB with this
    (TRL: 907-914). `malloc_trim` is glibc's; elsewhere (musl, macOS) there is nothing to do."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
