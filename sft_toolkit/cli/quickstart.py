"""`sft-toolkit quickstart [--recipe recipes/quickstart.yaml] [--max-steps N]`

The whole workflow on local assets, on CPU, in minutes: build the tiny assets, lint the template,
check the data, train, and print what was trained and how well.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..assets import build_quickstart_assets
from ..check_data import check_data
from ..lint import lint
from ..recipe import load_recipe
from ..templates import load_template
from ..train import GuardStop, train

QUICKSTART_MODEL = "tiny-chat"  # the folder name `build_quickstart_assets` builds the model under
DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def add_parser(sub) -> None:
    p = sub.add_parser("quickstart", help="build tiny local assets, lint, check data and train on CPU")
    p.add_argument(
        "--recipe",
        default=str(DEFAULT_RECIPE),
        help="the recipe to run (default: recipes/quickstart.yaml); when its model_name_or_path is a tiny-chat folder, "
        "the tiny assets (tiny-chat/ and data/ beside it) are built where missing",
    )
    p.add_argument("--max-steps", type=int, help="override the recipe's max_steps")


def run(args) -> int:
    overrides = {} if args.max_steps is None else {"max_steps": args.max_steps}
    recipe = load_recipe(args.recipe, overrides)
    model = Path(recipe.model.model_name_or_path)
    if model.name == QUICKSTART_MODEL:
        print(f"1/4 assets: {json.dumps({k: str(v) for k, v in build_quickstart_assets(model.parent).items()})}")
    else:  # a recipe of the user's own model: its folder gets no tiny-chat/ and data/ it would not use
        print(f"1/4 assets: none built (the recipe's model {model} is not a {QUICKSTART_MODEL} folder)")

    template = load_template(recipe.sft.chat_template_path)
    result = lint(template.source, template.origin, tokenizer=None)
    print(f"2/4 lint {template.origin}: {'ok' if result.ok else 'FAIL'}")
    if not result.ok:
        return 1

    report, _ = check_data(recipe)
    print(
        f"3/4 check-data: {'PASS' if report.ok else 'FAIL'} — {report.rows} rows, {report.sequences} "
        f"{'packed ' if recipe.sft.packing else ''}sequences, {report.trainable_tokens} trainable of {report.tokens} tokens"
    )
    if not report.ok:
        print("\n".join(report.problems()))
        return 1

    try:
        outcome = train(recipe)
    except GuardStop as stop:
        print(f"stopped by the mask guard: {stop}")
        return 1
    m = outcome.metrics
    print(
        f"4/4 trained {m.get('global_step', recipe.sft.max_steps)} steps in {m.get('train_runtime', 0):.0f} s: "
        f"{progress(m, recipe.sft.logging_steps)}; model saved to {outcome.output_dir}"
    )
    return 0


def progress(metrics: dict, logging_steps) -> str:
    """Loss and accuracy from the first to the last logged step; when no step was logged (a run shorter than
    logging_steps), the run's mean loss, said as such rather than printed as nan."""
    if "first_loss" not in metrics:
        mean = metrics.get("train_loss")
        return f"no step logged (logging_steps {logging_steps} is more than the steps run)" + (
            f", mean loss {mean:.3f}" if isinstance(mean, (int, float)) else ""
        )
    text = f"loss {metrics['first_loss']:.3f} → {metrics['last_loss']:.3f}"
    if "first_accuracy" in metrics:
        text += f", assistant-token accuracy {metrics['first_accuracy']:.3f} → {metrics['last_accuracy']:.3f}"
    return text
