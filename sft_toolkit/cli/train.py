"""`sft-toolkit train RECIPE.yaml [--mask-guard reject|repair|warn] [--prepared DIR] [--KEY VALUE ...]`

Any recipe key can be overridden on the command line (`--max_length 512`, `--packing true`); values are
read as YAML scalars. Under several processes: `accelerate launch -m sft_toolkit train RECIPE.yaml`.
"""

from __future__ import annotations

import json
import os

from ..masks import RenderLimit
from ..problems import InputError
from ..recipe import GuardMode, load_recipe
from ..train import GuardStop, train
from ._common import add_overrides_argument, parse_overrides, path_argument

ACCOUNTING = (
    "rows",
    "trainable_tokens",
    "trainable_tokens_before",
    "zero_mask_rows",
    "dropped_rows",
    "truncated_assistant_tokens",
    "orphaned_assistant_tokens",
    "sequences",
    "zero_trainable_sequences",
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train with TRL's SFTTrainer on a recipe, guarded",
        description="Check the data, apply the mask guard, then train with TRL's SFTTrainer.",
    )
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--mask-guard", choices=[mode.value for mode in GuardMode], help="override the recipe's mask_guard")
    p.add_argument(
        "--prepared",
        metavar="DIR",
        type=path_argument,
        help="train from a dataset `sft-toolkit prepare` saved (checked against the recipe; not re-tokenized)",
    )
    add_overrides_argument(p)


TAKES_OVERRIDES = True


def run(args) -> int:
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        # Under torchrun / accelerate launch: torch's `record` writes a rank's exception where the launcher
        # reads it, so when one rank fails, the launcher's summary names that exception as the root cause
        # (it ends the other ranks itself) instead of "error_file: <N/A>".
        from torch.distributed.elastic.multiprocessing.errors import record

        bad_input: list[Exception] = []

        def recorded(args) -> int:
            try:
                return _run(args)
            except (InputError, RenderLimit) as err:  # one line per rank from the CLI, not a root-cause traceback
                bad_input.append(err)
                return 2

        code = record(recorded)(args)
        if bad_input:
            raise bad_input[0]
        return code
    return _run(args)


def _run(args) -> int:
    overrides = parse_overrides(args.overrides)
    if args.mask_guard:
        overrides["mask_guard"] = args.mask_guard
    if args.prepared:
        overrides["prepared"] = args.prepared
    recipe = load_recipe(args.recipe, overrides)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        outcome = train(recipe, world_size=world_size)
    except GuardStop as stop:
        print(f"sft-toolkit train: stopped by the mask guard: {stop}", flush=True)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        # The same accounting check-data prints (its JSON keys): every row dropped or cut is counted.
        report = outcome.report.to_json()
        accounting = {k: report[k] for k in ACCOUNTING}
        if report["eval"] is not None:
            accounting["eval"] = {k: report["eval"][k] for k in ACCOUNTING}
        repairs = list(outcome.repairs.notes)  # what the mask guard changed and said
        print(
            json.dumps(
                {"output_dir": outcome.output_dir, **accounting, "repairs": repairs, **outcome.metrics},
                indent=2,
            )
        )
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """After a finished run, wait for every rank, then close the process group before the interpreter exits.
    A rank that exits while its peers still write their output tears the group down under them; on a
    loaded CPU machine that was seen as a SIGABRT of a rank whose training had already finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
