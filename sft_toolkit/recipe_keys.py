"""What happens to every recipe key: one decision per field of TRL's argument classes and the toolkit's own.

Recipes use the names `trl sft --config` reads (`ScriptArguments`, `SFTConfig`, `ModelConfig`,
`DatasetMixtureConfig`). Each key is honored the way `trl sft` (trl/scripts/sft.py) honors it, or refused
at recipe load with the reason: never accepted and then ignored. `RECIPE_KEYS` below names every field
of the installed TRL on purpose (no default for a group of names): a TRL upgrade that adds a field makes
tests/test_recipe_keys.py fail until someone decides what the toolkit does with it.

Keys that TRL or transformers renamed or removed are in `RENAMED`, so an older recipe gets the new
spelling instead of "unknown key".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Handling(enum.Enum):
    """Where a recipe key goes."""

    TRAINER = "passed to TRL's SFTTrainer in its SFTConfig, as `trl sft` passes it"
    MODEL_LOADING = (
        "passed to the model loading as `trl sft` does (model_init_kwargs, quantization_config, peft_config)"
    )
    DATA_PREPARATION = "applied by the toolkit's data preparation, which reproduces TRL's (what check-data counts)"
    DATASET_LOADING = "read by the toolkit's dataset loading, as `trl sft` loads datasets"
    TOOLKIT = "the toolkit's own key (TRL has no name for it)"
    REFUSED = "refused at recipe load"


@dataclass(frozen=True)
class KeyRule:
    handling: Handling
    note: str = ""  # for REFUSED: why, and what to do instead; otherwise what the toolkit adds to TRL's meaning


def _rules(handling: Handling, names: str, note: str = "") -> dict[str, KeyRule]:
    return {name: KeyRule(handling, note) for name in names.split()}


TRAINER, MODEL, DATA, DATASET, TOOLKIT, REFUSED = Handling

# transformers' TrainingArguments, as inherited by SFTConfig: the trainer reads them from the SFTConfig object
# the toolkit builds from the recipe and passes to SFTTrainer, unchanged.
_TRAINING_ARGUMENTS = _rules(
    TRAINER,
    """
    output_dir do_train do_eval do_predict eval_strategy prediction_loss_only per_device_train_batch_size
    per_device_eval_batch_size gradient_accumulation_steps eval_accumulation_steps eval_delay torch_empty_cache_steps
    learning_rate weight_decay adam_beta1 adam_beta2 adam_epsilon max_grad_norm num_train_epochs max_steps
    lr_scheduler_type lr_scheduler_kwargs warmup_steps log_level log_level_replica log_on_each_node logging_strategy
    logging_first_step logging_steps logging_nan_inf_filter save_strategy save_steps save_total_limit
    save_on_each_node save_only_model restore_callback_states_from_checkpoint use_cpu seed data_seed bf16 fp16
    bf16_full_eval fp16_full_eval tf32 local_rank ddp_backend debug dataloader_drop_last eval_steps
    dataloader_num_workers dataloader_prefetch_factor dataloader_in_order run_name disable_tqdm remove_unused_columns
    label_names load_best_model_at_end metric_for_best_model greater_is_better ignore_data_skip fsdp fsdp_config
    accelerator_config parallelism_config deepspeed label_smoothing_factor optim optim_args
    train_sampling_strategy length_column_name report_to project trackio_space_id trackio_bucket_id
    trackio_static_space_id ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers ddp_static_graph
    dataloader_pin_memory dataloader_persistent_workers dataloader_multiprocessing_context skip_memory_metrics
    hub_model_id hub_strategy hub_token hub_private_repo hub_always_push hub_revision
    activation_checkpointing activation_checkpointing_kwargs gradient_checkpointing gradient_checkpointing_kwargs
    include_for_metrics eval_do_concat_batches auto_find_batch_size full_determinism ddp_timeout torch_compile
    torch_compile_backend torch_compile_mode include_num_input_tokens_seen neftune_noise_alpha optim_target_modules
    batch_eval_metrics eval_on_start use_liger_kernel liger_kernel_config eval_use_gather_object
    average_tokens_across_devices use_cache enable_jit_checkpoint
""",
)

RECIPE_KEYS: dict[str, KeyRule] = {
    **_TRAINING_ARGUMENTS,
    "resume_from_checkpoint": KeyRule(
        TRAINER,
        "passed to trainer.train() as `trl sft` does; `true` resumes from the last complete checkpoint in output_dir",
    ),
    "push_to_hub": KeyRule(
        REFUSED,
        "the toolkit saves the model to output_dir and uploads nothing; upload it "
        "afterwards (`hf upload REPO OUTPUT_DIR`), or remove push_to_hub",
    ),
    # SFTConfig's own fields
    **_rules(TRAINER, "router_aux_loss_coef pad_to_multiple_of loss_type activation_offloading pad_token"),
    **_rules(MODEL, "model_init_kwargs trust_remote_code"),
    **_rules(
        DATA,
        "dataset_text_field dataset_num_proc max_length truncation_mode shuffle_dataset packing "
        "packing_strategy completion_only_loss",
    ),
    "chat_template_path": KeyRule(
        DATA, "a .jinja file or a bundled template name; the template is saved with the model"
    ),
    "assistant_only_loss": KeyRule(DATA, "the assistant mask is built into the labels by the toolkit's preparation"),
    "padding_free": KeyRule(DATA, "also passed to the trainer's collator"),
    "eval_packing": KeyRule(DATA, "packing of the eval split"),
    "eos_token": KeyRule(
        DATA, "set on the tokenizer before the data is rendered, as SFTTrainer does; also passed to the trainer"
    ),
    "dataset_kwargs": KeyRule(
        DATA,
        "TRL reads only skip_prepare_dataset from it; the toolkit prepares the data "
        "itself (pre-tokenized rows are taken as they are) and passes "
        "skip_prepare_dataset: true",
    ),
    # ModelConfig
    **_rules(MODEL, "model_name_or_path model_revision dtype attn_implementation"),
    **_rules(
        MODEL,
        "use_peft lora_r lora_alpha lora_dropout lora_target_modules lora_target_parameters "
        "lora_modules_to_save lora_task_type use_rslora use_dora",
        "through trl.get_peft_config",
    ),
    **_rules(
        MODEL,
        "load_in_8bit load_in_4bit bnb_4bit_quant_type use_bnb_nested_quant bnb_4bit_quant_storage",
        "through trl.get_quantization_config; needs CUDA and bitsandbytes (pip install 'sft-toolkit[qlora]')",
    ),
    # ScriptArguments and DatasetMixtureConfig
    **_rules(DATASET, "dataset_name dataset_config dataset_train_split dataset_test_split dataset_streaming"),
    **_rules(DATASET, "datasets streaming test_split_size", "a dataset mixture (trl.get_dataset)"),
    "ignore_bias_buffers": KeyRule(
        REFUSED, "`trl sft` reads it but never uses it (it is a DDP option of other TRL scripts); remove it"
    ),
    # ToolkitArguments (sft_toolkit/recipe.py)
    **_rules(
        TOOLKIT,
        "mask_guard max_zero_rows max_length_limit role_map train_roles train_turns prepared "
        "merge_adapter overwrite_output_dir early_stopping_patience",
    ),
}


@dataclass(frozen=True)
class Renamed:
    new: str | None  # the key to write instead; None when the setting is gone without a successor
    how: str


RENAMED: dict[str, Renamed] = {
    "warmup_ratio": Renamed(
        "warmup_steps",
        "transformers 5 removed warmup_ratio; a warmup_steps value below 1 is the same fraction of the training steps",
    ),
    "torch_dtype": Renamed("dtype", "TRL's ModelConfig and transformers 5 call it dtype"),
    "evaluation_strategy": Renamed("eval_strategy", "transformers renamed it"),
    "max_seq_length": Renamed("max_length", "TRL's SFTConfig renamed it"),
    "no_cuda": Renamed("use_cpu", "transformers renamed it"),
    "per_gpu_train_batch_size": Renamed("per_device_train_batch_size", "transformers renamed it"),
    "per_gpu_eval_batch_size": Renamed("per_device_eval_batch_size", "transformers renamed it"),
    "push_to_hub_token": Renamed("hub_token", "transformers renamed it"),
    "include_inputs_for_metrics": Renamed("include_for_metrics", "transformers renamed it (a list, e.g. [inputs])"),
    "logging_dir": Renamed(None, "transformers 5 removed logging_dir; the loggers write under output_dir"),
    "save_safetensors": Renamed(None, "transformers 5 always saves safetensors; remove it"),
    "dataset_batch_size": Renamed(None, "TRL removed dataset_batch_size; remove it"),
}


def renamed_message(key: str, value) -> str | None:
    """What to write instead of a renamed or removed key (None when `key` is not one)."""
    renamed = RENAMED.get(key)
    if renamed is None:
        return None
    if renamed.new is None:
        return f"'{key}' is no longer a setting: {renamed.how}"
    return f"'{key}' is now spelled '{renamed.new}' ({renamed.how}): write {renamed.new}: {value}"


def markdown_table(owners: dict[str, str]) -> str:
    """docs/recipe_keys.md's table: key, the class it belongs to (`owners`), what happens, and why or how."""
    rows = ["| key | from | what happens | |", "|---|---|---|---|"]
    order = list(Handling)
    for key, rule in sorted(RECIPE_KEYS.items(), key=lambda item: (order.index(item[1].handling), item[0])):
        what = "**refused**" if rule.handling is Handling.REFUSED else rule.handling.value
        rows.append(f"| `{key}` | {owners[key]} | {what} | {rule.note.replace('|', chr(92) + '|')} |")
    for key, renamed in sorted(RENAMED.items()):
        instead = f"write `{renamed.new}`" if renamed.new else "no longer a setting"
        rows.append(f"| `{key}` | (renamed or removed) | **refused**: {instead} | {renamed.how} |")
    return "\n".join(rows) + "\n"
