"""Benchmark: add-markers over TRL's templates (its dev set) and over the template corpus (real templates it was
not tuned on), and the converted templates on conversations the probes don't contain.

    python benchmarks/add_markers.py [--conversations 40] [--seeds 0 1 2 3] [--dev-set-only | --corpus-only]

Dev set: for each original template TRL installs (`trl/chat_templates/*.jinja` without `_training`), the time
`add_markers` takes (one core), whether it converts, and, for the converted ones, `--conversations` generated
conversations per seed (`probes.generated_conversations`) rendered through the original and the converted
template. A render counts as bad when the texts differ or lint's rendered rules (R001, R002, R003; R004
belongs to the original) find an error in the converted template's mask.

Corpus (`benchmarks/template_corpus.py`, downloaded first when missing): for each template, converted (and then
checked by the independent check of `tests/helpers/independent_check.py`: a converted template it finds wrong
counts as wrong, not converted), refused by the class of construct its message names, or not renderable (an
`InputError`: it renders no probe conversation); per origin, then every refusal with its message.
"""

from __future__ import annotations

import argparse
import collections
import platform
import shlex
import sys
import time
from pathlib import Path

import trl

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the corpus loader, and the tests' independent check

from helpers.independent_check import check_conversion  # noqa: E402

from benchmarks.template_corpus import download, templates  # noqa: E402
from sft_toolkit.lint import _check_probe  # noqa: E402
from sft_toolkit.markers import MarkerError, add_markers  # noqa: E402
from sft_toolkit.masks import TemplateRaised, render  # noqa: E402
from sft_toolkit.probes import PROBES, WEATHER_TOOL, Probe, generated_conversations  # noqa: E402
from sft_toolkit.problems import InputError  # noqa: E402
from sft_toolkit.turns import end_of_turn, usable_probe  # noqa: E402

# Refusal classes, by what add-markers' message names (first match wins).
REFUSAL_CLASSES = [
    ("outside the messages loop", "outside a `for message in messages` loop"),
    ("pre-filled by the prompt", "text the model is given in others"),
    ("one code for every role", "trains text of non-assistant messages"),
    ("tags jinja2 parses otherwise", "tags and jinja2's parse disagree"),
    ("output through filter/call", "could not be traced"),
    ("verification failed", "failed verification"),
]
NOT_RENDERABLE = "not renderable"


def refusal_class(message: str) -> str:
    return next((name for name, marker in REFUSAL_CLASSES if marker in message), "other")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--dev-set-only", action="store_true")
    only.add_argument("--corpus-only", action="store_true")
    args = parser.parse_args()
    print(
        f"python benchmarks/add_markers.py {shlex.join(sys.argv[1:])}  ({platform.machine()}, trl {trl.__version__})"
    )
    if not args.corpus_only:
        dev_set(args)
    if not args.dev_set_only:
        corpus()


def dev_set(args) -> None:
    conversations = [c for seed in args.seeds for c in generated_conversations(args.conversations, seed)]
    folder = Path(trl.__file__).parent / "chat_templates"
    print("\n## TRL's templates\n")
    print("| template | add-markers s | converted | renders | bad |\n|---|---:|---|---:|---:|")
    totals = collections.Counter()
    for path in sorted(p for p in folder.glob("*.jinja") if not p.stem.endswith("_training")):
        source = path.read_text()
        began = time.perf_counter()
        try:
            marked = add_markers(source).source
        except MarkerError:
            marked = None
        seconds = time.perf_counter() - began
        totals["seconds"] += seconds
        renders = bad = 0
        if marked is not None:
            eot = next((e for p in PROBES if (e := end_of_turn(source, usable_probe(source, p, {}), {}))), None)
            for messages in conversations:
                probe = usable_probe(source, Probe("generated", messages, [WEATHER_TOOL]), {})
                try:
                    expected = render(source, probe.messages, tools=probe.tools)
                except (TemplateRaised, InputError):
                    continue
                ours = render(marked, probe.messages, tools=probe.tools)
                renders += 1
                bad += ours.text != expected.text or any(
                    severity == "error" and rule != "R004"
                    for rule, severity, *_ in _check_probe(source, probe, ours, eot, {})
                )
        totals.update(converted=marked is not None, templates=1, renders=renders, bad=bad)
        print(f"| {path.stem} | {seconds:.2f} | {'yes' if marked is not None else 'no'} | {renders} | {bad} |")
    print(
        f"\n{totals['converted']} of {totals['templates']} converted in {totals['seconds']:.1f} s; "
        f"{totals['renders']} renders of generated conversations, {totals['bad']} bad"
    )


def corpus() -> None:
    download()
    found = templates()
    print(f"\n## Template corpus ({len(found)} templates, benchmarks/template_corpus.md)\n")
    rows, refusals, totals = collections.defaultdict(collections.Counter), [], collections.Counter()
    for template in found:
        began = time.process_time()
        try:
            marked, kind, message = add_markers(template.source).source, "converted", ""
        except MarkerError as err:
            marked, message = None, str(err)
            kind = refusal_class(message)
        except InputError as err:
            marked, kind, message = None, NOT_RENDERABLE, str(err)
        totals["seconds"] += time.process_time() - began
        if marked is not None:
            problems, checked = check_conversion(template.source, marked)
            totals["checked"] += checked
            if problems:
                kind, message = "wrong", f"{len(problems)} problems, first: {problems[0]}"
        if kind != "converted":
            refusals.append((template.name, kind, message))
        rows[template.group].update([kind, "templates"])
        totals.update([kind, "templates"])
    classes = [name for name, _ in REFUSAL_CLASSES if totals[name]] + ["other"] * bool(totals["other"])
    columns = ["templates", "converted", "wrong", *classes, NOT_RENDERABLE]
    print("| origin | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for group, counts in [*rows.items(), ("all", totals)]:
        print(f"| {group} | " + " | ".join(str(counts[c]) for c in columns) + " |")
    renderable = totals["templates"] - totals[NOT_RENDERABLE]
    print(
        f"\n{totals['converted']} of {renderable} renderable templates converted "
        f"({100 * totals['converted'] / renderable:.1f} %; {totals['templates']} in all), "
        f"{totals['wrong']} of them wrong on the independent check ({totals['checked']} conversations checked); "
        f"add-markers took {totals['seconds']:.0f} s of one core"
    )
    print("\n| refused | class | message |\n|---|---|---|")
    for name, kind, message in refusals:
        shown = message.splitlines()[0][:160].replace("|", "\\|")
        print(f"| {name} | {kind} | {shown} |")


if __name__ == "__main__":
    main()
