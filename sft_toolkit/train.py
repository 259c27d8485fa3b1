"""Train: TRL's SFTTrainer on a recipe, with the mask guarded before and during training.

Before: the check-data accounting runs on the exact dataset the trainer will get; per the recipe's
`mask_guard` the run is rejected (before any model weights load), repaired (zero-trainable rows and
packed sequences dropped, and said so with numbers) or allowed with a warning.

During: every optimizer step's trainable tokens are counted over all its micro-batches and summed over
all ranks (one all-reduce), and every loss is checked to be finite (one more). Every rank sees the same
sums, so every rank stops at the same step, before the optimizer applies it; the last checkpoint stays
the last good one.

Checkpoints are written atomically (see `GuardedSFTTrainer._save_checkpoint`), and `resume_from_checkpoint:
true` resumes from the last complete one, so a run killed at any moment resumes from a good state.

The model loads as `trl sft` loads it: ModelConfig's revision, dtype and attention implementation, the LoRA
adapter (`get_peft_config`) and 4/8-bit quantization (`get_quantization_config`, refused by name where it
can't run). The trained tokens are logged with the loss (`trainable_tokens`), so every `report_to` shows
them; `merge_adapter: true` also saves the adapter merged into its base model (see `merge.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .check_data import Report, check_splits, row_coverage_problems
from .guarded import Change, Guarded, Repairs
from .outputs import (
    FINAL_SAVE,
    STAGING,
    STAGING_RECORD,
    check_train_output,
    checkpoint_entries,
    checkpoint_step,
    make_staging,
    place_final_save,
    record_run_files,
    remove_checkpoint,
    remove_staging,
    rotate_checkpoints,
    run_file_problem,
)
from .prepared import load_prepared, read_manifest
from .preprocess import renders_conversations
from .problems import InputError
from .recipe import GuardMode, Recipe, with_changes

if TYPE_CHECKING:
    from trl import SFTConfig

# Max |logit difference| tolerated between a sequence alone and packed: float noise, not leakage.
ISOLATION_TOLERANCE = 1e-3
HALF_PRECISION_TOLERANCE = 5e-2  # bf16/fp16 kernels reorder sums differently for different lengths


def isolation_tolerance(model) -> float:
    return (
        HALF_PRECISION_TOLERANCE
        if next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
        else ISOLATION_TOLERANCE
    )


class GuardStop(RuntimeError):
    """Raised on every rank at once when a step would train on nothing or the loss is not finite."""


@dataclass
class Outcome:
    report: Report
    repairs: Repairs
    metrics: dict
    output_dir: str
    history: list[float]  # the logged training losses, in order


def guard(recipe: Recipe, world_size: int = 1, *, keep_provenance: bool = False) -> Guarded:
    """Decide before loading the model: the datasets to train and evaluate on (eval: None when eval_strategy
    is "no"), the recipe they were built with, and what was changed. The eval split's problems count like the
    train split's. `recipe` itself is never changed: a repair makes a new one (`Guarded.recipe`).

    First, a chat template without generation markers: reject stops, repair adds verified ones (add-markers),
    warn goes on (see `_ensure_markers`).
    reject: any problem stops the run (GuardStop) with the numbers and the fix.
    repair: the smallest change that makes the run sound, each said with its effect:
      assistant tokens cut by max_length -> max_length raised to the smallest value that keeps them all,
      if that is within the recipe's max_length_limit (what memory allows), else kept and reported;
      split/wrapped packing that orphans assistant tokens or wastes sequences -> bfd (re-checked);
      sequences left with zero trainable tokens -> dropped (counted).
    warn: go ahead, saying what is wrong; the in-training guard still stops a step with nothing to train.
    keep_provenance: keep each token's source row and position (src_rows, src_pos) for `prepare` to save.
    """
    guard_mode = recipe.guard_mode
    # Plain-text and pre-tokenized rows never meet the chat template: its markers don't matter for them.
    if recipe.sft.assistant_only_loss and renders_conversations(recipe):
        recipe, marked = _ensure_markers(recipe)
    else:
        marked = Repairs()
    report, dataset, eval_dataset = check_splits(recipe, world_size=world_size, keep_provenance=keep_provenance)
    notes = [*marked.notes, *(f"warning: {w}" for w in report.warnings)]
    problems = report.problems()
    if guard_mode is GuardMode.REJECT and problems:
        rows = f" Rows with nothing to train: {_shown_rows(report)}." if report.zero_mask_rows else ""
        if report.eval is not None and report.eval.zero_mask_rows:
            rows += f" Eval split rows with nothing to evaluate: {_shown_rows(report.eval)}."
        raise GuardStop(
            "mask guard (reject): "
            + "; ".join(problems)
            + "."
            + rows
            + " Fix the data or recipe, or set mask_guard: repair."
        )
    if guard_mode is GuardMode.WARN or not problems:
        notes += [f"warning: {p}" for p in problems]
        repairs = Repairs(chat_template_path=marked.chat_template_path, notes=tuple(notes))
        return Guarded(report, dataset, eval_dataset, recipe, repairs)
    return _repair(
        Guarded(report, dataset, eval_dataset, recipe, Repairs(chat_template_path=marked.chat_template_path)),
        notes,
        world_size=world_size,
        keep_provenance=keep_provenance,
    )


def _repair(checked: Guarded, said: list[str], *, world_size: int, keep_provenance: bool) -> Guarded:
    """mask_guard: repair, on a checked run with problems (see `guard`): each change makes a new recipe or
    report, checked again where the data changes, and is said with its effect after `said` (the notes so far)."""
    report, dataset, eval_dataset, recipe = checked.report, checked.dataset, checked.eval_dataset, checked.recipe
    notes = list(said)
    max_length = packing_strategy = None
    limit = recipe.toolkit.max_length_limit
    sft = recipe.sft
    if (
        report.truncated_assistant_tokens
        and sft.max_length is not None
        and not (sft.packing and sft.packing_strategy != "bfd")
    ):
        needed = report.max_length_to_keep_all
        if limit is not None and needed <= limit:
            before = report
            max_length = Change(sft.max_length, needed)
            recipe = recipe.with_sft(max_length=needed)
            report, dataset, eval_dataset = check_splits(
                recipe, world_size=world_size, keep_provenance=keep_provenance
            )
            notes.append(
                f"max_length {before.settings['max_length']} -> {needed} (max_length_limit {limit}): "
                f"assistant tokens lost to truncation {before.truncated_assistant_tokens} -> "
                f"{report.truncated_assistant_tokens}, zero-trainable rows {len(before.zero_mask_rows)} -> "
                f"{len(report.zero_mask_rows)}"
            )
        else:
            notes.append(
                f"kept max_length {sft.max_length}: keeping every assistant token needs {needed} "
                f"(max_length_limit {limit}); {report.truncated_assistant_tokens} assistant tokens are cut"
            )
    sft = recipe.sft
    if (
        sft.packing
        and sft.packing_strategy != "bfd"
        and (report.orphaned_assistant_tokens or report.zero_trainable_sequences)
    ):
        before = report
        packing_strategy = Change(sft.packing_strategy, "bfd")
        recipe = recipe.with_sft(packing_strategy="bfd")
        report, dataset, eval_dataset = check_splits(recipe, world_size=world_size, keep_provenance=keep_provenance)
        notes.append(
            f"packing_strategy {before.settings['packing_strategy']} -> bfd: assistant tokens trained "
            f"without context {before.orphaned_assistant_tokens} -> {report.orphaned_assistant_tokens}, "
            f"zero-trainable sequences {before.zero_trainable_sequences} -> "
            f"{report.zero_trainable_sequences} of {report.sequences}"
        )
    dropped = _zero_sequences(dataset)
    if dropped:
        dataset = drop_zero_trainable(dataset)
        notes.append(f"dropped {dropped} of {report.sequences} sequences with zero trainable tokens")
        # the report describes what is trained from here on (the note keeps what was dropped)
        report = dataclasses.replace(report, sequences=len(dataset), zero_trainable_sequences=0)
    if report.zero_mask_rows:
        notes.append(
            f"{len(report.zero_mask_rows)} rows have nothing to train and contribute no loss: {_shown_rows(report)}"
        )
    dropped_eval = 0
    if report.eval is not None:
        dropped_eval = _zero_sequences(eval_dataset)
        if dropped_eval:  # an eval batch with no label gives a NaN loss
            eval_dataset = drop_zero_trainable(eval_dataset)
            notes.append(
                f"eval split: dropped {dropped_eval} of {report.eval.sequences} sequences with zero trainable tokens"
            )
            evaluated = dataclasses.replace(report.eval, sequences=len(eval_dataset), zero_trainable_sequences=0)
            report = dataclasses.replace(report, eval=evaluated)
        if report.eval.zero_mask_rows:
            notes.append(
                f"eval split: {len(report.eval.zero_mask_rows)} rows have nothing to evaluate: "
                f"{_shown_rows(report.eval)}"
            )
    if report.coverage_problem_rows:  # nothing to repair in the data: the template decides what is trained
        shown = ", ".join(
            f"{r['index']} ("
            + "; ".join(f"{p['reason']}, message {p['message']}" for p in row_coverage_problems(r))
            + ")"
            for r in report.coverage_problem_rows[:10]
        )
        notes.append(
            f"warning: {len(report.coverage_problem_rows)} rows are trained as the template marks them, "
            f"which is not their assistant text alone: {shown}; lint the template"
        )
    if report.coverage_unchecked_rows:
        notes.append(
            f"warning: content coverage not checked for {len(report.coverage_unchecked_rows)} rows (the tokenizer "
            f"gives no offsets and its decoded tokens are not the rows' text, or the row renders differently when "
            f"rendered again): "
            f"{', '.join(map(str, report.coverage_unchecked_rows[:10]))}"
        )
    repairs = dataclasses.replace(
        checked.repairs,
        max_length=max_length,
        packing_strategy=packing_strategy,
        dropped_sequences=dropped,
        dropped_eval_sequences=dropped_eval,
        notes=tuple(notes),
    )
    return Guarded(report, dataset, eval_dataset, recipe, repairs)


def _shown_rows(report: Report, limit: int = 10) -> str:
    more = len(report.zero_mask_rows) - limit
    return ", ".join(f"{r['index']} ({r['reason']})" for r in report.zero_mask_rows[:limit]) + (
        f" and {more} more" if more > 0 else ""
    )


def _ensure_markers(recipe: Recipe) -> tuple[Recipe, Repairs]:
    """A chat template without generation markers makes every row train on nothing. reject: stop and say how
    to fix it; repair: add verified markers (`sft-toolkit add-markers`), save them in the output folder and
    train with them; warn: go on (the in-training guard stops the first empty step).

    Returns the recipe to go on with (after a repair, a new one whose chat_template_path is the written
    template) and what was done and said."""
    from trl.chat_template_utils import has_generation_markers

    from .markers import MarkerError, add_markers
    from .masks import RenderLimit
    from .preprocess import load_tokenizer_for, training_template

    tokenizer = load_tokenizer_for(recipe)
    if has_generation_markers(training_template(tokenizer, recipe.sft) or tokenizer.chat_template):
        return recipe, Repairs()
    where = recipe.sft.chat_template_path or recipe.model.model_name_or_path
    convert = (
        f"run `sft-toolkit add-markers {shlex.quote(str(where))} -o training.jinja` and set chat_template_path: "
        "training.jinja"
    )
    fix = f"{convert}, or set mask_guard: repair to add verified markers automatically"
    guard_mode = recipe.guard_mode
    if guard_mode is GuardMode.WARN:
        warning = (
            f"warning: the chat template of {where} has no {{% generation %}} markers, so nothing is trained; {fix}"
        )
        return recipe, Repairs(notes=(warning,))
    if guard_mode is GuardMode.REJECT:
        raise GuardStop(
            f"mask guard (reject): the chat template of {where} has no {{% generation %}} markers, so "
            f"assistant_only_loss would train on nothing; {fix}."
        )
    if isinstance(tokenizer.chat_template, dict):  # named templates: one repaired file would replace them all
        raise GuardStop(
            f"mask guard (repair): the tokenizer of {where} has several named chat templates "
            f"({', '.join(map(repr, sorted(tokenizer.chat_template)))}) and its default has no {{% generation %}} "
            "markers; a repaired template set as chat_template_path would replace all of them (rows with tools "
            f"would no longer render with 'tool_use'), so repair does not choose: {convert} for "
            "the template your rows should train with."
        )
    try:
        result = add_markers(tokenizer.chat_template, tokenizer=tokenizer)
    except (RenderLimit, InputError) as err:  # a runaway or failing template is unusable input: exit 2
        raise InputError(f"the chat template of {where}: {err}") from None
    except MarkerError as err:
        raise GuardStop(
            f"mask guard (repair): the chat template of {where} has no {{% generation %}} markers and "
            f"they could not be added automatically ({err}); place them by hand and check with "
            "`sft-toolkit lint`."
        ) from None
    path = Path(recipe.sft.output_dir) / REPAIRED_TEMPLATE
    # Rewritten only when it holds these very bytes or a run recorded it (`outputs.RUN_FILES`); never a user's.
    same = path.is_file() and not path.is_symlink() and path.read_bytes() == result.source.encode("utf-8")
    problem = None if same else run_file_problem(path.parent, path.name)
    if os.path.lexists(path.parent) and not path.parent.is_dir():
        problem = f"{path.parent} is a file, not a folder"
    if problem:
        raise InputError(
            f"{recipe.source}: output_dir: {problem}; mask_guard: repair writes the repaired chat template "
            "there; nothing was changed; move it away or choose another output_dir"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every rank writes the same text; a rename makes each write whole, so no rank reads a half-written file.
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    staged.write_text(result.source, encoding="utf-8")
    os.replace(staged, path)
    record_run_files(path.parent, [path.name])
    note = (
        f"added {{% generation %}} markers to the chat template of {where} ({result.blocks} blocks; renders "
        f"byte-identically on the probe corpus and passes lint); training with {path}"
    )
    return recipe.with_sft(chat_template_path=str(path)), Repairs(chat_template_path=str(path), notes=(note,))


def _zero_sequences(dataset) -> int:
    return sum(all(label == -100 for label in labels) for labels in dataset["labels"])


def packing_isolation(trainer, *, use_cache: bool = False) -> float:
    """Largest logit difference for a sequence run alone vs packed after another one (0.0 = isolated).

    Packed (padding-free) sequences share one row; they stay separate only if the model builds its
    attention from `position_ids`. transformers does that for sdpa/eager only without a cache, and
    remote-code models may not at all, so we measure it on the real model and collator, the same forward
    `compute_loss` makes (`use_cache=False`), instead of trusting it.

    The probe runs before the training engine wraps the model, where the weights may not be whole on every
    rank: under DeepSpeed ZeRO-3 they are partitioned (gathered here for the two short forwards: measured by
    benchmarks/gpu_suite.sh, a forward on the partitions fails with "Padding_idx must be within num_embeddings"),
    and with FSDP's `cpu_ram_efficient_loading` the ranks other than the first hold meta tensors. A rank that
    cannot run the forward takes the largest difference measured by the ranks that can, so every rank decides
    alike.
    """
    tokenizer = trainer.processing_class
    first = tokenizer("The first conversation talks about kilometres.", add_special_tokens=False)["input_ids"]
    second = tokenizer("A second, unrelated one about grams.", add_special_tokens=False)["input_ids"]

    def example(ids, lengths):
        return {"input_ids": ids, "labels": ids, "seq_lengths": lengths}

    packed = trainer.data_collator([example(first + second, [len(first), len(second)])])
    alone = trainer.data_collator([example(second, [len(second)])])
    model = trainer.model
    difference = None
    with whole_weights(model):
        if not any(parameter.is_meta for parameter in model.parameters()):
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    keep = {"input_ids", "attention_mask", "position_ids"}
                    run = {k: v.to(model.device) for k, v in packed.items() if k in keep}
                    solo = {k: v.to(model.device) for k, v in alone.items() if k in keep}
                    logits = model(**run, use_cache=use_cache).logits[0, len(first) : len(first) + len(second)]
                    alone_logits = model(**solo, use_cache=use_cache).logits[0, : len(second)]
            finally:
                model.train(was_training)
            difference = float((logits.float() - alone_logits.float()).abs().max())
    return shared_maximum(difference)


def whole_weights(model):
    """A context in which the model's weights are whole on this rank: ZeRO-3's partitions gathered (every rank
    must enter it, as every rank runs `train`), nothing to do otherwise."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def shared_maximum(value: float | None) -> float:
    """The largest of every rank's `value` (None: this rank could not measure); the value itself on one
    process. Raises when no rank measured anything."""
    import torch.distributed as dist

    values = [value]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
    measured = [v for v in values if v is not None]
    if not measured:
        raise RuntimeError(
            "the packing-isolation probe found the model's weights on the meta device on every rank; "
            "load the model with its weights on at least one rank (fsdp_cpu_ram_efficient_loading keeps them on "
            "the first), or set packing: false"
        )
    return max(measured)


def whole_final_save(trainer, log=print) -> None:
    """Make the final `save_model` write the whole model under FSDP with a sharded state dict.

    transformers' `save_model` writes model weights under FSDP only for `FULL_STATE_DICT`
    (transformers/trainer.py, `save_model`); with `SHARDED_STATE_DICT` it writes nothing, so output_dir ends
    with no model and `from_pretrained(output_dir)` fails (measured by benchmarks/gpu_suite.sh: "Unrecognized
    model ... Should have a `model_type` key"). `trl sft` calls `save_model` as it is; the toolkit switches the
    final save to the full state dict, as alignment-handbook's scripts do, and says so. The checkpoints keep the
    sharded type.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        return
    plugin = trainer.accelerator.state.fsdp_plugin
    if "FULL_STATE_DICT" in str(plugin.state_dict_type):
        return
    plugin.set_state_dict_type("FULL_STATE_DICT")
    if trainer.is_world_process_zero():
        log(
            "fsdp: checkpoints were saved with a sharded state dict; the final model is saved with the full one, "
            "so output_dir loads with from_pretrained"
        )


def zero3_checkpoint_note(trainer) -> str | None:
    """What the final save writes under DeepSpeed ZeRO-3 when the weights are not gathered (None otherwise).

    transformers' `save_model` under ZeRO-3 asks accelerate for the whole state dict; with
    `stage3_gather_16bit_weights_on_model_save` false accelerate refuses, and transformers only logs a warning at
    the end of training and writes a DeepSpeed checkpoint (`global_stepN/`, partitioned weights) instead of a
    model: `from_pretrained(output_dir)` then fails. The toolkit says so before training, naming the setting, so
    the run can be stopped and relaunched with it; it does not flip DeepSpeed's engine config behind its back.
    """
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    if zero.get("stage") != 3 or zero.get("stage3_gather_16bit_weights_on_model_save") is True:
        return None
    return (
        "deepspeed: ZeRO-3 without stage3_gather_16bit_weights_on_model_save, so the final save is a DeepSpeed "
        "checkpoint (global_stepN/), not a model from_pretrained loads; recover the weights with the "
        "zero_to_fp32.py script DeepSpeed writes beside it, or set zero3_save_16bit_model: true in the accelerate "
        "config (stage3_gather_16bit_weights_on_model_save: true in a DeepSpeed JSON) and launch again"
    )


def drop_zero_trainable(dataset):
    return dataset.filter(lambda labels: any(label != -100 for label in labels), input_columns="labels")


# Checkpoints are written under output_dir/STAGING/checkpoint-N, then renamed to output_dir/checkpoint-N; the
# final model under output_dir/STAGING/FINAL_SAVE, then moved into output_dir (`outputs.place_final_save`).
REPAIRED_TEMPLATE = "training_chat_template.jinja"  # what mask_guard: repair writes in output_dir
# Test hook (tests/test_faults.py): SFT_TOOLKIT_FAIL_AT="RANK:STEP" makes that rank raise an exception at that
# step, to prove that one rank failing ends every rank. Unset, it costs one environment lookup per step.
FAIL_AT_ENV = "SFT_TOOLKIT_FAIL_AT"


def last_complete_checkpoint(output_dir: str, log=print) -> str | None:
    """The newest checkpoint-N in output_dir whose trainer_state.json reads (None when there is none).

    transformers' `get_last_checkpoint` takes the highest-numbered directory as it is. Our own saves are
    atomic, but a directory from a plain transformers save killed half-way (trainer_state.json is written
    last) or from an interrupted copy would be loaded as good; it is skipped, and said so.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(output_dir)
    found = (
        [
            (int(p.name.rsplit("-", 1)[1]), p)
            for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
            if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()
        ]
        if folder.is_dir()
        else []
    )
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            return str(path)
        except (OSError, ValueError):
            log(f"resume: {path} is incomplete (no readable trainer_state.json, an interrupted save?); skipped")
    return None


def _resume_step(output_dir: str) -> int | None:
    """The step `resume_from_checkpoint: true` resumes from in output_dir (None: no complete checkpoint)."""
    last = last_complete_checkpoint(output_dir, log=lambda _: None)
    return checkpoint_step(last) if last else None


def guarded_trainer_class():
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from trl import SFTTrainer

    class GuardedSFTTrainer(SFTTrainer):
        """SFTTrainer plus the in-training guard (see the module docstring) and atomic checkpoints."""

        _staging = False
        _finalizing = False
        _trainable_since_log = 0  # trainable tokens of the optimizer steps not logged yet (all ranks)
        eval_trainable_tokens: int | None = None  # the eval split's (check-data's count), logged with each eval

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.data_collator = _with_source_rows(self.data_collator)

        def _set_signature_columns_if_needed(self):
            # Keep each token's source row (from check_data) up to the collator, which turns it into the
            # batch's list of dataset rows; get_batch_samples takes it out before the model sees the batch.
            super()._set_signature_columns_if_needed()
            if "src_rows" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "src_rows"]

        def _get_output_dir(self, trial):
            run_dir = super()._get_output_dir(trial)
            if self._finalizing:  # a folder that never exists: see _finalize_training
                return os.path.join(run_dir, STAGING, f"{FINAL_SAVE}-cleanup-none")
            return os.path.join(run_dir, STAGING) if self._staging else run_dir

        def _finalize_training(self, trial, num_train_samples, start_time):
            """With save_total_limit 1 and a best checkpoint, transformers' `_finalize_training` rmtree's every
            `checkpoint-*` folder of output_dir but the best one, checkpoint or not (a user's `checkpoint-7`
            holding notes). It finds none here (its output_dir is pointed at a folder that does not exist), and
            the same cleanup runs after it over the checkpoints `outputs.checkpoint_step` proves."""
            self._finalizing = True
            try:
                output = super()._finalize_training(trial, num_train_samples, start_time)
            finally:
                self._finalizing = False
            best = self.state.best_model_checkpoint
            if self.args.should_save and best is not None and self.args.save_total_limit == 1:
                for path in checkpoint_entries(self._get_output_dir(trial)):
                    if checkpoint_step(path) is not None and os.path.realpath(path) != os.path.realpath(best):
                        remove_checkpoint(path)
            return output

        def create_model_card(self, *args, **kwargs):
            """TRL writes the model card to output_dir/README.md at every checkpoint save: only where no file
            is, or over the card a run of the toolkit recorded (`check_train_output` refused a user's up front;
            one put there since is kept, and the card not written); each written card is recorded."""
            if not self.is_world_process_zero():
                return
            if run_file_problem(self.args.output_dir, "README.md") is None:
                super().create_model_card(*args, **kwargs)
                record_run_files(self.args.output_dir, ["README.md"])

        def _save_checkpoint(self, model, trial):
            """transformers writes checkpoint-N in place (weights, optimizer, scheduler, RNG, then
            trainer_state.json), and `resume_from_checkpoint=True` takes the highest-numbered checkpoint-N
            directory, complete or not: a save killed half-way leaves one that resume loads as good (or dies
            on). So every rank writes into output_dir/.incomplete/checkpoint-N (transformers' own save, pointed
            there through `_get_output_dir`), and once all have finished, the main process renames it into
            place: a rename is atomic, so checkpoint-N is either complete or absent. Rotation
            (save_total_limit) then runs on the real directory."""
            run_dir = self._get_output_dir(trial)
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            staged, final = os.path.join(run_dir, STAGING, name), os.path.join(run_dir, name)
            if self.args.should_save:
                remove_staging(staged)  # left by a save that was killed, proven the toolkit's (its record)
                make_staging(staged)  # with the record that proves it, before any rank writes there
            self.accelerator.wait_for_everyone()
            self._staging = True
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = False
            best = self.state.best_model_checkpoint
            if best and os.path.dirname(best) == os.path.dirname(staged):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                if os.path.lexists(final):  # an earlier save of this step: replaced only if provably a checkpoint
                    remove_checkpoint(final)
                os.replace(staged, final)
                # Placed, it is a checkpoint (proven by its trainer_state.json), no longer a staged save; dropped
                # after the rename, so a save killed before it still leaves a staged folder the toolkit can prove.
                Path(final, STAGING_RECORD).unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # leave no empty staging folder behind
                    os.rmdir(os.path.dirname(staged))
                # Like transformers' save_total_limit rotation, but only over checkpoints it can prove are ones.
                rotate_checkpoints(run_dir, self.args.save_total_limit, keep=(final, self.state.best_model_checkpoint))
            self.accelerator.wait_for_everyone()

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            fail = os.environ.get(FAIL_AT_ENV)
            if fail and fail == f"{self.accelerator.process_index}:{self.state.global_step + 1}":
                raise RuntimeError(f"injected failure on rank {self.accelerator.process_index} ({FAIL_AT_ENV}={fail})")
            samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            rows = sorted({int(r) for s in samples for r in s.pop(SOURCE_ROWS, torch.empty(0)).flatten() if r >= 0})
            local = sum(int((s["labels"][..., 1:] != -100).sum()) for s in samples if "labels" in s)
            # One collective: every rank learns every rank's count, so all decide alike and stop together.
            counts = self.accelerator.gather(torch.tensor([local], device=self.accelerator.device)).tolist()
            empty = [rank for rank, n in enumerate(counts) if n == 0]
            if samples and empty:
                mine = self.accelerator.process_index in empty
                shown = ", ".join(map(str, rows[:20])) + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")
                here = (
                    f"; rank {self.accelerator.process_index}'s batch holds dataset rows {shown}"
                    if mine and rows
                    else ""
                )
                raise GuardStop(
                    f"step {self.state.global_step + 1}: zero trainable tokens on rank(s) "
                    f"{', '.join(map(str, empty))} of {len(counts)} (tokens per rank: {counts}){here}; "
                    "the step would spend compute on nothing. Run `sft-toolkit check-data` on this "
                    "recipe to see why those rows train nothing, or use mask_guard: repair."
                )
            self._trainable_since_log += sum(counts)
            return samples, num_items

        def log(self, logs, start_time=None):
            """A training log also carries the trainable tokens (summed over all ranks) of the optimizer steps
            since the previous one (`trainable_tokens`; each step's with logging_steps: 1) and of the whole
            run (`trainable_tokens_total`, continued from the log history a resumed run reloads). An evaluation's
            log carries the eval split's trainable tokens (`eval_trainable_tokens`): every evaluation covers it all.
            """
            if "loss" in logs:
                logs = {**logs, **trainable_token_logs(self.state.log_history, self._trainable_since_log)}
                self._trainable_since_log = 0
            if "eval_loss" in logs and self.eval_trainable_tokens is not None:
                logs = {**logs, "eval_trainable_tokens": self.eval_trainable_tokens}
            super().log(logs, start_time)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs.pop(SOURCE_ROWS, None)  # (evaluation batches don't pass through get_batch_samples)
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            loss = result[0] if return_outputs else result
            if model.training:
                bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=loss.device)
                if float(self.accelerator.reduce(bad, "sum")) > 0:
                    raise GuardStop(
                        f"step {self.state.global_step + 1}: non-finite loss ({loss.item()}) on "
                        f"{int(self.accelerator.reduce(bad, 'sum'))} rank(s); stopped before the "
                        "optimizer step. Lower the learning rate or check the data."
                    )
            return result

    return GuardedSFTTrainer


SOURCE_ROWS = "source_rows"


def trainable_token_logs(log_history: list[dict], since_last_log: int) -> dict:
    """`trainable_tokens` (since the previous training log) and `trainable_tokens_total` (the run so far)."""
    before = next(
        (entry["trainable_tokens_total"] for entry in reversed(log_history) if "trainable_tokens_total" in entry), 0
    )
    return {"trainable_tokens": since_last_log, "trainable_tokens_total": before + since_last_log}


def _with_source_rows(collate):
    """TRL's collator builds the batch from the columns it knows and ignores the rest; this adds, per example,
    the dataset rows its tokens came from (a -1-padded tensor), so a guard stop can name them."""

    def collate_with_rows(examples):
        batch = collate(examples)
        if examples and "src_rows" in examples[0]:
            rows = [list(dict.fromkeys(int(r) for r in e["src_rows"])) for e in examples]
            width = max(1, max(len(r) for r in rows))
            batch[SOURCE_ROWS] = torch.tensor([r + [-1] * (width - len(r)) for r in rows])
        return batch

    return collate_with_rows


def prepared_trainer_args(recipe: Recipe) -> SFTConfig:
    """The recipe's SFTConfig, set up for a dataset check_data already prepared (tokenized, labelled,
    truncated or packed exactly as TRL would) and a tokenizer that already carries the template: a new
    SFTConfig; the recipe's own stays as it is."""
    sft, model_args = recipe.sft, recipe.model
    return with_changes(
        sft,
        # As TRL's own `trl sft` script does: the model's loading options come from ModelConfig.
        model_init_kwargs={
            "revision": model_args.model_revision,
            "trust_remote_code": sft.trust_remote_code,
            "attn_implementation": model_args.attn_implementation,
            "dtype": model_args.dtype,
            **(sft.model_init_kwargs or {}),
        },
        # The template is already on the tokenizer (bundled names resolved); TRL would look a name up on the hub.
        chat_template_path=None,
        dataset_kwargs={**(sft.dataset_kwargs or {}), "skip_prepare_dataset": True},
        # The assistant mask is already in the labels (-100 elsewhere); TRL only checks this flag against a raw
        # conversational dataset, which the trainer no longer receives.
        assistant_only_loss=False,
    )


def quantization_missing() -> list[str]:
    """What this machine lacks for bitsandbytes 4/8-bit training (empty when it can run)."""
    import importlib.util

    missing = [] if torch.cuda.is_available() else ["a CUDA GPU (none is visible)"]
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes (pip install 'sft-toolkit[qlora]')")
    return missing


def quantization_config(recipe):
    """The `quantization_config` `trl sft` passes to SFTTrainer (trl.get_quantization_config; None without
    load_in_4bit/load_in_8bit). InputError, before any weights load, naming the key and what is missing when
    this machine can't load the model that way."""
    from trl import get_quantization_config

    model = recipe.model
    key = "load_in_4bit" if model.load_in_4bit else "load_in_8bit" if model.load_in_8bit else None
    if key is None:
        return None
    missing = quantization_missing()
    if missing:
        raise InputError(
            f"{recipe.source}: {key}: quantized loading needs {' and '.join(missing)}; run on a CUDA "
            f"machine with bitsandbytes, or remove {key} to train in {model.dtype}"
        )
    return get_quantization_config(model)


def _callbacks(recipe) -> list:
    """The toolkit keys that become trainer callbacks: early_stopping_patience (transformers' own callback)."""
    from transformers import EarlyStoppingCallback

    patience = recipe.toolkit.early_stopping_patience
    return [EarlyStoppingCallback(early_stopping_patience=patience)] if patience is not None else []


def check_backend(recipe) -> None:
    """InputError when accelerate's config asks for a backend this run would not use. accelerate applies an
    FSDP config only on accelerator devices: in accelerate 1.15, `AcceleratorState.__init__`
    (accelerate/state.py:986-1013) turns DistributedType into FSDP only from MULTI_GPU, MULTI_NPU, MULTI_XPU and
    the other accelerator types, never from MULTI_CPU, so with `use_cpu` the same launch runs as DDP on gloo, every
    rank holding the whole model, without a word. torch's own `fully_shard` does train on CPU with gloo (two ranks,
    torch 2.13); the block is accelerate's. benchmarks/gpu_suite.sh runs the FSDP2 launch on GPUs."""
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    running = recipe.sft.distributed_state.distributed_type  # sets up the process group, as the trainer would
    if running in (DistributedType.MULTI_CPU, DistributedType.NO):
        raise InputError(
            f"{recipe.source}: accelerate's config asks for FSDP, but this run is "
            f"{running.value} (use_cpu: {recipe.sft.use_cpu}): accelerate shards only on accelerator "
            "devices (accelerate 1.15, accelerate/state.py:986-1013: only an accelerator's MULTI_* type becomes "
            "FSDP), so every rank would hold the whole model. Launch with --multi_gpu (DDP) on CPU, "
            "or run FSDP on GPUs (benchmarks/gpu_suite.sh checks that launch)"
        )


def train(recipe: Recipe, *, world_size: int = 1, log=print) -> Outcome:
    """Check, decide, then train with TRL. Raises GuardStop when the guard refuses or stops the run."""
    from trl import get_peft_config

    from .merge import check_merge_target, merge_run, merged_dir
    from .preprocess import load_tokenizer_for, training_template

    quantization = quantization_config(recipe)  # refuses before anything runs when it can't be honored
    if recipe.toolkit.merge_adapter:
        check_merge_target(merged_dir(recipe.sft.output_dir))
    # Before anything reads data or loads weights: an output_dir this run would damage is refused.
    earlier = check_train_output(recipe, resume_step=_resume_step)
    check_backend(recipe)
    if recipe.toolkit.prepared:  # saved by `sft-toolkit prepare`: checked against the recipe, not re-tokenized
        # The same template repair as from raw data (deterministic), so the template hashes can be compared.
        rendered = read_manifest(recipe.toolkit.prepared)["template"].get("sha256") is not None
        marked = Repairs()
        if recipe.sft.assistant_only_loss and rendered:
            recipe, marked = _ensure_markers(recipe)
        guarded = load_prepared(recipe, world_size)  # (eval_strategy is refused with prepared: train split only)
        notes = (*marked.notes, *guarded.repairs.notes)
        repairs = dataclasses.replace(guarded.repairs, chat_template_path=marked.chat_template_path, notes=notes)
        guarded = dataclasses.replace(guarded, repairs=repairs)
        log(
            f"prepared dataset {recipe.toolkit.prepared}: manifest matches the recipe, tokenizer and template; "
            f"{len(guarded.dataset)} sequences re-checked; not re-tokenized"
        )
    else:
        # Once per job, not once per rank: the main process tokenizes and accounts first, the other ranks wait,
        # then find every step in the datasets cache (TRL prepares its datasets the same way). A guard stop on
        # the main process releases the others, which reach the same decision from the cache.
        with recipe.sft.main_process_first(desc="dataset preparation"):
            guarded = guard(recipe, world_size, keep_provenance=True)
        if "src_pos" in (guarded.dataset.column_names or ()):  # only the source rows travel with batches
            guarded = dataclasses.replace(guarded, dataset=guarded.dataset.remove_columns("src_pos"))
    # From here on the run uses the recipe the guard decided on (its repairs applied).
    recipe, report, dataset, eval_dataset = guarded.recipe, guarded.report, guarded.dataset, guarded.eval_dataset
    for note in guarded.repairs.notes:
        log(f"mask guard ({recipe.toolkit.mask_guard}): {note}")

    if earlier and int(os.environ.get("RANK", "0")) == 0:  # overwrite_output_dir: the earlier run's checkpoints
        for path in earlier:
            remove_checkpoint(path)
        log(
            f"overwrite_output_dir: removed the earlier run's {', '.join(p.name for p in earlier)} from "
            f"{recipe.sft.output_dir}"
        )
    tokenizer = load_tokenizer_for(recipe)
    # Plain-text data needs no template, and a base model may have none.
    template = training_template(tokenizer, recipe.sft) if tokenizer.chat_template else None
    if template:
        tokenizer.chat_template = template  # saved with the model, so the trained format travels with it
    sft = prepared_trainer_args(recipe)
    trainer = guarded_trainer_class()(
        model=recipe.model.model_name_or_path,
        args=sft,
        train_dataset=dataset,
        eval_dataset=eval_dataset,  # None unless eval_strategy evaluates, as in `trl sft`
        processing_class=tokenizer,
        quantization_config=quantization,
        peft_config=get_peft_config(recipe.model),
        callbacks=_callbacks(recipe),
    )
    if report.eval is not None:
        trainer.eval_trainable_tokens = report.eval.trainable_tokens
    if trainer.padding_free:
        leak = packing_isolation(trainer)
        if leak > isolation_tolerance(trainer.model):
            message = (
                f"packed sequences attend to each other under attn_implementation="
                f"{trainer.model.config._attn_implementation!r} (logits differ by {leak:.3g} when a sequence is "
                "packed after another); set packing: false and padding_free: false, or use an attention "
                "implementation that reads position_ids (flash_attention_2, sdpa)"
            )
            if recipe.guard_mode is not GuardMode.WARN:
                raise GuardStop(f"mask guard: {message}")
            log(f"mask guard (warn): warning: {message}")
    resume = sft.resume_from_checkpoint
    if resume == "true":
        resume = last_complete_checkpoint(sft.output_dir, log)
        log(f"resume: from {resume}" if resume else f"resume: no complete checkpoint in {sft.output_dir}; from step 0")
    zero3_note = zero3_checkpoint_note(trainer)
    if zero3_note and trainer.is_world_process_zero():
        log(f"warning: {zero3_note}")
    result = trainer.train(resume_from_checkpoint=resume)
    whole_final_save(trainer, log)
    # Saved whole under the staging folder, then moved into output_dir over the files only a run recorded.
    final = Path(sft.output_dir) / STAGING / FINAL_SAVE
    if trainer.args.should_save:
        remove_staging(final)  # left by a final save that was killed, proven the toolkit's (its record)
        make_staging(final)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(final))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        place_final_save(final, sft.output_dir)
    if zero3_note and trainer.is_world_process_zero():
        log(f"warning: {zero3_note}")
    if recipe.toolkit.merge_adapter and trainer.is_world_process_zero():
        merged = merge_run(sft.output_dir, merged_dir(sft.output_dir), trust_remote_code=sft.trust_remote_code)
        log(f"merge_adapter: saved the merged model to {merged}")
    metrics = dict(result.metrics)
    history = [h for h in trainer.state.log_history if "loss" in h]
    if history:
        metrics["first_loss"], metrics["last_loss"] = history[0]["loss"], history[-1]["loss"]
        accuracy = [h["mean_token_accuracy"] for h in history if "mean_token_accuracy" in h]
        if accuracy:
            metrics["first_accuracy"], metrics["last_accuracy"] = accuracy[0], accuracy[-1]
    evaluations = [h for h in trainer.state.log_history if "eval_loss" in h]
    if evaluations:
        metrics["first_eval_loss"], metrics["eval_loss"] = evaluations[0]["eval_loss"], evaluations[-1]["eval_loss"]
        if "eval_trainable_tokens" in evaluations[-1]:
            metrics["eval_trainable_tokens"] = evaluations[-1]["eval_trainable_tokens"]
    if trainer.state.best_model_checkpoint:  # load_best_model_at_end: the saved model is this checkpoint's
        metrics["best_model_checkpoint"] = trainer.state.best_model_checkpoint
        metrics["best_metric"] = trainer.state.best_metric
    metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
    return Outcome(
        report=report,
        repairs=guarded.repairs,
        metrics=metrics,
        output_dir=sft.output_dir,
        history=[h["loss"] for h in history],
    )
