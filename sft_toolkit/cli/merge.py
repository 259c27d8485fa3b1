"""`sft-toolkit merge RUN_DIR -o DIR`: save a LoRA run's adapter merged into its base model.

RUN_DIR is a `train` output_dir (or a checkpoint-N in it) of a run with `use_peft: true`; DIR receives an
ordinary model (`AutoModelForCausalLM.from_pretrained(DIR)`) with the run's tokenizer and training chat
template. DIR must be new or empty, or hold an earlier merge (its ownership record verified). Exit 0 saved, 2 bad
input (no adapter, DIR not empty, base missing).
The same as the recipe key `merge_adapter: true`, which does it at the end of training.
"""

from __future__ import annotations

import shlex
import sys

from ..merge import MERGE_STAGE, merge_run
from ..outputs import leftovers
from ._common import path_argument


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a LoRA run's adapter into its base model and save it",
        description="Load the base model, merge the run's LoRA adapter into it and save the model "
        "with the run's tokenizer and chat template into a new or empty directory.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a train output_dir (or checkpoint-N) holding a LoRA adapter")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="DIR",
        type=path_argument,
        help="new or empty directory for the merged model (or one an earlier merge saved)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the base model's own code (as the recipe's trust_remote_code: true did for training)",
    )


def run(args) -> int:
    target = merge_run(args.run_dir, args.output, trust_remote_code=args.trust_remote_code)
    print(f"saved the merged model and tokenizer to {target}")
    for left in leftovers(target, (MERGE_STAGE,)):
        print(
            f"sft-toolkit merge: note: {left} is what an interrupted merge left (no command reads it); "
            f"if no merge is running, remove it with: rm -r {shlex.quote(str(left))}",
            file=sys.stderr,
        )
    return 0
