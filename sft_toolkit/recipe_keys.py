"""What happens to every recipe key: one decision per field of TRL's argument classes and the toolkit's own.

Recipes use the names `trl sft --config` reads (`ScriptArguments`, `SFTConfig`, `ModelConfig`,
`DatasetMixtureConfig`). Each key is honored the way `trl sft` (trl/scripts/sft.py) honors it, or refused
at recipe load with the reason: never accepted and then ignored. `RECIPE_KEYS` below names every field
of the installed TRL on purpose (no default for a group of names): a TRL upgrade that adds a field makes
tests/test_recipe_keys.py fail until someone decides what the toolkit does with it.

Keys that TRL or transformers renamed or removed are in `RENAMED`, so an older recipe gets the new
spelling instead of "unknown key"; keys that alignment-handbook or open-r1 recipes carry for their own scripts,
and `trl sft`'s launcher keys, are in `FOREIGN`, each with what to write instead. `PUBLIC_RECIPES` lists every
top-level key seen in public `trl sft`-shaped recipes and where; docs/recipe_keys.md shows what becomes of each.
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
    # transformers reads these only while it uploads (push_to_hub), which the toolkit refuses: accepted, they
    # would change nothing.
    **_rules(
        REFUSED,
        "hub_model_id hub_strategy hub_token hub_private_repo hub_always_push hub_revision",
        "transformers reads it only to upload the model (push_to_hub), and the toolkit uploads nothing: it "
        "saves to output_dir; remove the key and upload afterwards (`hf upload REPO OUTPUT_DIR`)",
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
    "use_liger": Renamed(
        "use_liger_kernel", "TRL's SFTConfig dropped use_liger; transformers' name is use_liger_kernel"
    ),
}

# `env`: the one key of a `trl sft --config` file that is no field. TrlParser sets each entry as an environment
# variable (the value as text) before the arguments are built; the toolkit does the same (recipe.build_recipe).
ENV_KEY = "env"

# `dataset_mixture`: the alignment-handbook's mixture (its scripts' ScriptArguments), which `trl sft` does not read.
# Handbook recipes use it more than any other way of naming data, so the toolkit loads it as the handbook's
# `get_dataset` does (recipe.handbook_mixture_from, data.load_splits).
HANDBOOK_MIXTURE_KEY = "dataset_mixture"


@dataclass(frozen=True)
class Foreign:
    """A key that another entry point reads and `trl sft` does not: where it comes from, and what to write."""

    source: str
    instead: str


_HANDBOOK = "the alignment-handbook's scripts read it"
_OPEN_R1 = "open-r1's own SFTConfig adds it"
_LAUNCHER = "`trl sft` hands it to `accelerate launch`, not to the training"
_ACCELERATE_INSTEAD = (
    "launch the toolkit the same way: `accelerate launch --{key} VALUE -m sft_toolkit train RECIPE.yaml` "
    "(configs in recipes/accelerate/)"
)

# Keys of alignment-handbook and open-r1 recipes and of `trl sft`'s launcher, which `trl sft` never passes to
# training. Without this table they would meet difflib's closest name, which misleads for several of them
# (accelerate_config is not accelerator_config, hub_model_revision is not model_revision).
FOREIGN: dict[str, Foreign] = {
    "chat_template": Foreign(
        _HANDBOOK + " (an inline Jinja string set on the tokenizer)",
        "save the template to a .jinja file and write chat_template_path: FILE (the toolkit lints it and saves it "
        "with the model)",
    ),
    "dataset_mixer": Foreign(
        _HANDBOOK + " (versions before 0.4: dataset id -> proportion)",
        "write datasets: [{path: ID, split: SPLIT}] (trl sft's mixture), or dataset_name: ID for one dataset",
    ),
    "dataset_splits": Foreign(
        _HANDBOOK + " (versions before 0.4)",
        "write dataset_train_split: SPLIT and dataset_test_split: SPLIT (or split: per datasets entry)",
    ),
    "dataset_configs": Foreign(
        _HANDBOOK + " (versions before 0.4: one config per mixed dataset)",
        "write dataset_config: NAME (or name: per datasets entry)",
    ),
    "preprocessing_num_workers": Foreign(_HANDBOOK + " (versions before 0.4)", "write dataset_num_proc: N"),
    "use_flash_attention_2": Foreign(
        _HANDBOOK + " (versions before 0.3)", "write attn_implementation: flash_attention_2"
    ),
    "text_column": Foreign(_HANDBOOK + " (continued pretraining)", "write dataset_text_field: COLUMN"),
    "truncation_side": Foreign(
        _HANDBOOK + " (set on the tokenizer)",
        "write truncation_mode: keep_start (truncation_side: right) or keep_end (left)",
    ),
    "auto_insert_empty_system_msg": Foreign(
        _HANDBOOK + " (an empty system message put before each conversation)",
        "trl sft renders each conversation as it is; remove the key, and add a system message to the rows "
        "(or the chat template) where you want one",
    ),
    "tokenizer_name_or_path": Foreign(
        _HANDBOOK,
        "trl sft loads the tokenizer from model_name_or_path; put the tokenizer files there, or remove the key",
    ),
    "model_code_revision": Foreign(_HANDBOOK, "write model_revision: REVISION"),
    "base_model_revision": Foreign(
        _HANDBOOK + " (the base model of a PEFT adapter)", "write model_revision: REVISION"
    ),
    "callbacks": Foreign(
        _OPEN_R1 + " (push_to_hub_revision uploads each checkpoint)",
        "the toolkit uploads nothing; remove the key and upload output_dir afterwards (`hf upload`)",
    ),
    "benchmarks": Foreign(
        _OPEN_R1 + " (evaluations started after training)", "remove the key and evaluate output_dir afterwards"
    ),
    "system_prompt": Foreign(
        _OPEN_R1 + " (for its benchmarks, not for training)",
        "remove the key; a system message for training belongs in the rows or the chat template",
    ),
    "hub_model_revision": Foreign(
        _OPEN_R1 + " (the branch it uploads to)", "the toolkit uploads nothing; remove the key"
    ),
    "push_to_hub_revision": Foreign(_OPEN_R1, "the toolkit uploads nothing; remove the key"),
    "overwrite_hub_revision": Foreign(_OPEN_R1, "the toolkit uploads nothing; remove the key"),
    "wandb_entity": Foreign(_OPEN_R1, "write env: {WANDB_ENTITY: NAME} (wandb reads it), with report_to: wandb"),
    "wandb_project": Foreign(
        _OPEN_R1, "write env: {WANDB_PROJECT: NAME} (transformers' wandb logger reads it), with report_to: wandb"
    ),
    "wandb_run_group": Foreign(_OPEN_R1, "write env: {WANDB_RUN_GROUP: NAME} (wandb reads it), with report_to: wandb"),
    **{
        key: Foreign(_LAUNCHER, _ACCELERATE_INSTEAD.format(key=key))
        for key in (
            "num_processes num_machines machine_rank main_process_ip main_process_port mixed_precision "
            "multi_gpu use_deepspeed use_fsdp dynamo_backend"
        ).split()
    },
    "accelerate_config": Foreign(
        _LAUNCHER + " (as --config_file; a bare name is a file of trl/accelerate_configs/)",
        "launch the toolkit with it: `accelerate launch --config_file FILE -m sft_toolkit train RECIPE.yaml` "
        "(configs in recipes/accelerate/)",
    ),
}

# Values of a key that the installed TRL no longer accepts, and what to write instead.
OLD_VALUES: dict[tuple[str, str], str] = {
    ("packing_strategy", "ffd"): "TRL replaced first-fit packing by best-fit: write packing_strategy: bfd",
}


def renamed_message(key: str, value) -> str | None:
    """What to write instead of a renamed or removed key, or of a key only other scripts read (None when
    `key` is neither)."""
    foreign = FOREIGN.get(key)
    if foreign is not None:
        return f"'{key}' is not a key of trl sft ({foreign.source}): {foreign.instead}"
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


_H = "alignment-handbook recipes/"
_R1 = "open-r1 recipes/"
_ALL_HANDBOOK = _H + "zephyr-7b-beta, smollm, smollm2, smollm3, starchat2-15b, constitutional-ai (sft)"
_ALL = _ALL_HANDBOOK + "; " + _R1 + "OlympicCoder-7B, Qwen2.5-1.5B-Instruct, R1-Distill-Qwen3-8B (sft)"

# Every top-level key of the public `trl sft`-shaped SFT recipes read for the parity audit, and where it was seen.
# docs/recipe_keys.md shows each with the toolkit's decision; tests/test_recipe_parity.py proves each decision
# against TRL's own TrlParser on a recipe of the same shape.
PUBLIC_RECIPES: dict[str, str] = {
    "model_name_or_path": _ALL + "; trl examples/cli_configs/example_config.yaml",
    "model_revision": _ALL,
    "torch_dtype": _ALL,
    "attn_implementation": _ALL,
    "use_flash_attention_2": _H + "gemma-7b/sft/config_full_neftune.yaml",
    "trust_remote_code": _H + "smollm3/sft/sft.yaml",
    "use_peft": _H + "zephyr-7b-beta/sft/config_qlora.yaml",
    "load_in_4bit": _H + "zephyr-7b-beta/sft/config_qlora.yaml",
    "lora_r": _H + "zephyr-7b-beta/sft/config_qlora.yaml",
    "lora_alpha": _H + "zephyr-7b-beta/sft/config_qlora.yaml",
    "lora_dropout": _H + "zephyr-7b-beta/sft/config_qlora.yaml",
    "lora_target_modules": _H + "zephyr-7b-beta/sft/config_qlora.yaml",
    "chat_template": _ALL_HANDBOOK + ", gemma-7b; " + _R1 + "Qwen2.5-1.5B-Instruct, R1-Distill-Qwen3-8B",
    "dataset_mixture": _H + "zephyr-7b-beta, smollm, smollm3, starchat2-15b, constitutional-ai (sft)",
    "dataset_mixer": _H + "gemma-7b/sft, gpt2-nl/cpt",
    "dataset_splits": _H + "gemma-7b/sft, gpt2-nl/cpt",
    "dataset_configs": _H + "gpt2-nl/cpt; " + _R1 + "Qwen2.5-1.5B-Instruct/sft/config_demo.yaml",
    "preprocessing_num_workers": _H + "gemma-7b/sft, gpt2-nl/cpt",
    "dataset_name": _H + "smollm2/sft; " + _R1 + "all sft; trl examples/cli_configs/example_config.yaml",
    "dataset_config": _H + "smollm2/sft; " + _R1 + "OlympicCoder-7B, R1-Distill-Qwen3-8B",
    "dataset_train_split": _H + "smollm2/sft/config.yaml",
    "dataset_test_split": _H + "smollm2/sft/config.yaml",
    "dataset_num_proc": _ALL,
    "dataset_kwargs": _H + "smollm/sft/config.yaml (add_special_tokens, append_concat_token)",
    "eos_token": _H + "smollm3/sft/sft.yaml; " + _R1 + "R1-Distill-Qwen3-8B",
    "assistant_only_loss": _H + "smollm3/sft/sft.yaml",
    "packing": _H + "smollm3; " + _R1 + "all sft",
    "packing_strategy": _H + "smollm3/sft/sft.yaml (ffd)",
    "max_length": _H + "smollm2, smollm3, starchat2-15b, zephyr-7b-beta qlora; " + _R1 + "OlympicCoder-7B",
    "max_seq_length": _H + "zephyr-7b-beta, constitutional-ai, gemma-7b, gpt2-nl; " + _R1 + "Qwen2.5-1.5B-Instruct",
    "bf16": _ALL,
    "do_eval": _ALL,
    "do_train": _H + "constitutional-ai/sft/config_anthropic.yaml",
    "eval_strategy": _ALL,
    "evaluation_strategy": _H + "gemma-7b/sft/config_full_neftune.yaml",
    "gradient_accumulation_steps": _ALL,
    "gradient_checkpointing": _ALL,
    "gradient_checkpointing_kwargs": _ALL,
    "learning_rate": _ALL + "; trl examples/cli_configs/example_config.yaml",
    "log_level": _ALL,
    "logging_steps": _ALL,
    "logging_strategy": _ALL,
    "lr_scheduler_type": _ALL + "; trl examples/cli_configs/example_config.yaml",
    "lr_scheduler_kwargs": _H + "smollm3; " + _R1 + "all sft (min_lr_rate)",
    "max_grad_norm": _H + "smollm3; " + _R1 + "OlympicCoder-7B, R1-Distill-Qwen3-8B",
    "max_steps": _ALL,
    "num_train_epochs": _ALL,
    "neftune_noise_alpha": _H + "gemma-7b/sft/config_full_neftune.yaml",
    "weight_decay": _H + "gemma-7b/sft/config_full_neftune.yaml",
    "output_dir": _ALL,
    "overwrite_output_dir": _ALL,
    "per_device_train_batch_size": _ALL,
    "per_device_eval_batch_size": _ALL,
    "remove_unused_columns": _ALL_HANDBOOK,
    "report_to": _ALL + "; trl examples/cli_configs/example_config.yaml",
    "run_name": _H + "smollm3/sft/sft.yaml",
    "save_strategy": _ALL,
    "save_steps": _H + "zephyr-7b-beta, constitutional-ai; " + _R1 + "OlympicCoder-7B (0.2: a fraction)",
    "save_total_limit": _ALL,
    "seed": _ALL,
    "warmup_ratio": _ALL,
    "ddp_timeout": _H + "smollm3/sft/sft.yaml",
    "average_tokens_across_devices": _H + "smollm3/sft/sft.yaml",
    "use_liger_kernel": _H + "smollm3; " + _R1 + "R1-Distill-Qwen3-8B",
    "use_liger": _R1 + "OlympicCoder-7B, Qwen2.5-1.5B-Instruct",
    "push_to_hub": _ALL,
    "hub_model_id": _ALL,
    "hub_strategy": _ALL,
    "hub_model_revision": _R1 + "R1-Distill-Qwen3-8B",
    "callbacks": _R1 + "R1-Distill-Qwen3-8B (push_to_hub_revision)",
    "benchmarks": _R1 + "R1-Distill-Qwen3-8B",
    "system_prompt": "open-r1 src/open_r1/configs.py (SFTConfig)",
    "push_to_hub_revision": "open-r1 src/open_r1/configs.py (SFTConfig)",
    "overwrite_hub_revision": "open-r1 src/open_r1/configs.py (SFTConfig)",
    "wandb_entity": "open-r1 src/open_r1/configs.py (SFTConfig)",
    "wandb_project": "open-r1 src/open_r1/configs.py (SFTConfig)",
    "auto_insert_empty_system_msg": "alignment-handbook src/alignment/configs.py (DataArguments, before 0.4)",
    "truncation_side": "alignment-handbook src/alignment/configs.py (DataArguments, before 0.4)",
    "text_column": "alignment-handbook src/alignment/configs.py (DataArguments, before 0.4)",
    "tokenizer_name_or_path": "alignment-handbook src/alignment/configs.py (ModelArguments, before 0.4)",
    "model_code_revision": "alignment-handbook src/alignment/configs.py (ModelArguments, before 0.4)",
    "base_model_revision": "alignment-handbook src/alignment/configs.py (ModelArguments, before 0.4)",
    "env": "trl examples/cli_configs/example_config.yaml; TrlParser's docstring",
    "accelerate_config": "trl docs/source/clis.md (`accelerate_config: zero2` in an sft config)",
    "num_processes": "TRL CLI configs (launcher options beside the training keys)",
}


def verdict(key: str) -> str:
    """What the toolkit does with `key`, in words, from the decision tables above."""
    if key == ENV_KEY:
        return (
            "honored: each entry set as an environment variable, as TrlParser does: when any command reads the "
            "recipe, before its other keys are checked, for the rest of that process"
        )
    if key == HANDBOOK_MIXTURE_KEY:
        return (
            "honored as the alignment-handbook's get_dataset builds it (each source's split and columns, a `weight` "
            "share after a shuffle with `seed`, all shuffled with `seed`, `test_split_size` split off with it)"
        )
    if key in FOREIGN:
        return f"**refused**: {FOREIGN[key].instead}"
    if key in RENAMED:
        renamed = RENAMED[key]
        return f"**refused**: write `{renamed.new}`" if renamed.new else "**refused**: no longer a setting"
    rule = RECIPE_KEYS.get(key)
    if rule is None:
        return "**refused**: unknown key"
    if rule.handling is Handling.REFUSED:
        return "**refused** unless at its default: " + rule.note
    return "honored: " + rule.handling.value


def inventory_table() -> str:
    """docs/recipe_keys.md's table of the keys public recipes use."""
    rows = [
        "| key | seen in | what the toolkit does |",
        "|---|---|---|",
    ]
    for key, where in sorted(PUBLIC_RECIPES.items()):
        rows.append(f"| `{key}` | {where} | {verdict(key).replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"
