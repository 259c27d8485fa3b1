"""Train: TRL's SFTTrainer on a recipe, with the mask guarded before and during training.

Before: the check-data accounting runs on the exact dataset the trainer will get; per the recipe's
`mask_guard` the run is rejected (before any model weights load), repaired (zero-trainable rows and
packed sequences dropped, and said so with numbers) or allowed with a warning.

During: every optimizer step's trainable tokens are counted over all its micro-batches and summed over
all ranks (one all-reduce), and every loss is checked to be finite (one more). Every rank sees the same
sums, so every rank stops at the same step, before the optimizer applies it; the last checkpoint stays
the last good one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .check_data import Report, check_data


class GuardStop(RuntimeError):
    """Raised on every rank at once when a step would train on nothing or the loss is not finite."""


@dataclass
class Outcome:
    report: Report
    repairs: list[str]
    metrics: dict
    output_dir: str


def guard(report: Report, policy: str) -> tuple[bool, list[str]]:
    """Decide before loading the model: (go ahead?, what will be repaired or warned about)."""
    problems = report.problems()
    if not problems:
        return True, []
    if policy == "reject":
        return False, problems
    if policy == "warn":
        return True, [f"warning: {p}" for p in problems]
    repairs = []
    if report.orphaned_assistant_tokens:
        # Splitting can't be undone by dropping: only a different packing strategy repairs it.
        return False, problems + ["repair cannot un-split conversations: set packing_strategy: bfd"]
    if report.zero_trainable_sequences:
        repairs.append(f"dropped {report.zero_trainable_sequences} of {report.sequences} sequences with zero "
                       "trainable tokens")
    return True, repairs


def drop_zero_trainable(dataset):
    return dataset.filter(lambda labels: any(label != -100 for label in labels), input_columns="labels")


def guarded_trainer_class():
    from trl import SFTTrainer

    class GuardedSFTTrainer(SFTTrainer):
        """SFTTrainer plus the in-training guard (see the module docstring)."""

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            local = sum(int((s["labels"][..., 1:] != -100).sum()) for s in samples if "labels" in s)
            total = self.accelerator.reduce(torch.tensor(local, device=self.accelerator.device), "sum")
            if samples and int(total) == 0:
                raise GuardStop(f"step {self.state.global_step + 1}: zero trainable tokens on every rank "
                                f"({len(samples)} micro-batches each); the step would train on nothing. "
                                "Run check-data on this recipe to find the rows.")
            return samples, num_items

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            loss = result[0] if return_outputs else result
            if model.training:
                bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=loss.device)
                if float(self.accelerator.reduce(bad, "sum")) > 0:
                    raise GuardStop(f"step {self.state.global_step + 1}: non-finite loss ({loss.item()}) on "
                                    f"{int(self.accelerator.reduce(bad, 'sum'))} rank(s); stopped before the "
                                    "optimizer step. Lower the learning rate or check the data.")
            return result

    return GuardedSFTTrainer


def train(recipe, *, world_size: int = 1, log=print) -> Outcome:
    """Check, decide, then train with TRL. Raises GuardStop when the guard refuses or stops the run."""
    from trl import get_peft_config

    from .preprocess import load_tokenizer_for, training_template

    report, dataset = check_data(recipe, world_size=world_size)
    go, notes = guard(report, recipe.toolkit.mask_guard)
    if not go:
        raise GuardStop("mask guard (reject): " + "; ".join(notes)
                        + ". Fix the data or recipe, or set mask_guard: repair.")
    for note in notes:
        log(f"mask guard ({recipe.toolkit.mask_guard}): {note}")
    if recipe.toolkit.mask_guard == "repair" and report.zero_trainable_sequences:
        dataset = drop_zero_trainable(dataset)

    tokenizer = load_tokenizer_for(recipe)
    template = training_template(tokenizer, recipe.sft)
    if template:
        tokenizer.chat_template = template  # saved with the model, so the trained format travels with it
    sft, model_args = recipe.sft, recipe.model
    # As TRL's own `trl sft` script does: the model's loading options come from ModelConfig.
    sft.model_init_kwargs = {"revision": model_args.model_revision, "trust_remote_code": sft.trust_remote_code,
                             "attn_implementation": model_args.attn_implementation, "dtype": model_args.dtype,
                             **(sft.model_init_kwargs or {})}
    # The template is already on the tokenizer (bundled names resolved); TRL would look a name up on the hub.
    sft.chat_template_path = None
    # The dataset is already prepared (tokenized, labelled, truncated or packed) exactly as TRL would.
    sft.dataset_kwargs = {**(sft.dataset_kwargs or {}), "skip_prepare_dataset": True}
    # The assistant mask is already in the labels (-100 elsewhere); TRL only checks this flag against a raw
    # conversational dataset, which the trainer no longer receives.
    sft.assistant_only_loss = False
    trainer = guarded_trainer_class()(
        model=recipe.model.model_name_or_path,
        args=sft,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(recipe.model),
    )
    result = trainer.train(resume_from_checkpoint=sft.resume_from_checkpoint)
    trainer.save_model(sft.output_dir)
    metrics = dict(result.metrics)
    history = [h for h in trainer.state.log_history if "loss" in h]
    if history:
        metrics["first_loss"], metrics["last_loss"] = history[0]["loss"], history[-1]["loss"]
        accuracy = [h["mean_token_accuracy"] for h in history if "mean_token_accuracy" in h]
        if accuracy:
            metrics["first_accuracy"], metrics["last_accuracy"] = accuracy[0], accuracy[-1]
    metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
    return Outcome(report=report, repairs=notes, metrics=metrics, output_dir=sft.output_dir)
