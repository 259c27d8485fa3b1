"""Merged export: a LoRA run's adapter folded into its base model, saved as one ordinary model.

A LoRA run's output_dir holds only the adapter (and the tokenizer with the training chat template); serving
it needs PEFT and the base model. `merge_run` loads the base model unquantized (also after QLoRA, so the
merged weights are not rounded to 4 bits), merges the adapter into it and saves the model with the run's
tokenizer, so `AutoModelForCausalLM.from_pretrained(DIR)` and the chat template it was trained with are all
that is needed. The target is a new or empty directory, or one an earlier merge saved (its ownership record,
`outputs.OWNER_FILE`, verified): the merge never writes over files it did not make.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from .outputs import check_not_deleted_whole, ownership_problem, write_owner_record
from .problems import InputError

ADAPTER_CONFIG = "adapter_config.json"
MERGED = "merged"  # the folder `merge_adapter: true` writes under output_dir
MERGED_KIND = "merged model"  # the kind its ownership record names: a later merge replaces only such a folder


def merged_dir(output_dir: str) -> Path:
    return Path(output_dir) / MERGED


def check_merge_target(target: Path) -> None:
    """A new or empty directory (not a link, not a file), so no file of the user's is ever replaced."""
    if target.is_symlink():
        raise InputError(f"{target}: is a symbolic link; give the merged model a new directory")
    if target.exists() and not target.is_dir():
        raise InputError(f"{target}: exists and is not a directory; give the merged model a new directory")
    if target.is_dir() and any(target.iterdir()) and (problem := ownership_problem(target, MERGED_KIND)):
        raise InputError(
            f"{target}: exists and is not empty; the merge writes only into a new or empty directory, or over a "
            f"merged model of its own ({problem}) (move that one away or give another)"
        )
    check_not_deleted_whole(target, "the merged model")


# A merge is saved beside its target as `.NAME.MERGE_STAGE-TOKEN`, then renamed into place; a killed merge leaves
# it behind (`outputs.leftovers(target, (MERGE_STAGE,))` names them).
MERGE_STAGE = "incomplete"


def merge_run(run_dir: str, target: str | Path, *, trust_remote_code: bool = False) -> Path:
    """Merge the LoRA adapter saved in `run_dir` into its base model and save model + tokenizer in `target`.
    `trust_remote_code` as the run was trained (SFTConfig.trust_remote_code): a remote-code base needs it."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    run, target = Path(run_dir), Path(target)
    if not run.is_dir():
        raise InputError(f"{run_dir}: no such run directory")
    if not (run / ADAPTER_CONFIG).is_file():
        raise InputError(
            f"{run_dir}: no LoRA adapter here ({ADAPTER_CONFIG} is missing): only a run trained with "
            "use_peft: true has an adapter to merge; a full fine-tune is already a whole model"
        )
    check_merge_target(target)
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(str(run), trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(run), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"{run_dir}: cannot load the adapter and its base model ({first}); the base model named "
            f"in {ADAPTER_CONFIG} (base_model_name_or_path) must be reachable"
        ) from None
    merged = model.merge_and_unload()
    # Written beside the target under a fresh name and renamed into place: an interrupted merge leaves no half
    # model under its name, and no folder already there (a user's, or another merge's) is ever written into.
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.{MERGE_STAGE}-{secrets.token_hex(8)}")
    staged.mkdir()
    token = staged.name.rpartition("-")[2]
    try:
        merged.save_pretrained(str(staged))
        tokenizer.save_pretrained(str(staged))
        write_owner_record(staged, MERGED_KIND, token)  # a later merge to the same target may replace it
        check_merge_target(target)  # again: the target may have changed while the model was saved
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)  # made by this call, under a name no one else uses
        raise
    # An earlier merge of the toolkit's (its record verified) is moved aside first, then removed once the new one
    # is in place; an empty directory is replaced by the rename itself.
    previous = target.with_name(f".{target.name}.{MERGE_STAGE}-{token}-replaced")
    earlier = target.is_dir() and any(target.iterdir())
    try:
        if earlier:
            os.rename(target, previous)
        try:
            os.replace(staged, target)  # replaces only an empty directory; never a non-empty one
        except OSError:
            if earlier:
                os.rename(previous, target)  # put the earlier merge back
            raise
    except OSError as err:
        raise InputError(
            f"{target}: cannot be written ({err.strerror or err}; a file put there since the check?); it was "
            f"left as it was and the merged model kept at {staged}"
        ) from None
    if earlier:
        if ownership_problem(previous, MERGED_KIND) is None:
            shutil.rmtree(previous)
        else:  # changed between the check and the rename: keep it, and say where
            raise InputError(
                f"{target}: changed while it was being replaced; the new merged model is in place and the earlier "
                f"one was kept at {previous}"
            )
    return target
