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

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def add_parser(sub) -> None:
    p = sub.add_parser("quickstart", help="build tiny local assets, lint, check data and train on CPU")
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    p.add_argument("--max-steps", type=int, help="override the recipe's max_steps")


def run(args) -> int:
    overrides = {} if args.max_steps is None else {"max_steps": args.max_steps}
    recipe = load_recipe(args.recipe, overrides)
    root = Path(recipe.model.model_name_or_path).parent
    print(f"1/4 assets: {json.dumps({k: str(v) for k, v in build_quickstart_assets(root).items()})}")

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
        f"loss {m.get('first_loss', float('nan')):.3f} → {m.get('last_loss', float('nan')):.3f}, "
        f"assistant-token accuracy {m.get('first_accuracy', float('nan')):.3f} → "
        f"{m.get('last_accuracy', float('nan')):.3f}; model saved to {outcome.output_dir}"
    )
    return 0
