"""Benchmark: add-markers over TRL's templates, and the converted templates on conversations the probes
don't contain.

    python benchmarks/add_markers.py [--conversations 40] [--seeds 0 1 2 3]

For each original template TRL installs (`trl/chat_templates/*.jinja` without `_training`): the time
`add_markers` takes (one core), whether it converts, and, for the converted ones, `--conversations`
generated conversations per seed (`probes.generated_conversations`) rendered through the original and the
converted template. A render counts as bad when the texts differ or lint's rendered rules (R001, R002,
R003; R004 belongs to the original) find an error in the converted template's mask.
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

from sft_toolkit.lint import _check_probe
from sft_toolkit.markers import MarkerError, add_markers
from sft_toolkit.masks import TemplateRaised, render
from sft_toolkit.probes import PROBES, WEATHER_TOOL, Probe, generated_conversations
from sft_toolkit.problems import InputError
from sft_toolkit.turns import end_of_turn, usable_probe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    conversations = [c for seed in args.seeds for c in generated_conversations(args.conversations, seed)]
    folder = Path(trl.__file__).parent / "chat_templates"
    print(
        f"python benchmarks/add_markers.py {shlex.join(sys.argv[1:])}  ({platform.machine()}, trl {trl.__version__})"
    )
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


if __name__ == "__main__":
    main()
