"""Benchmark: what the runaway-template bounds cost a normal row.

    python benchmarks/render_bounds.py [--rows 2000] [--repeats 5]

check-data tokenizes each row inside `masks.render_budget` (a timer signal) and checks the token count
against `masks.over_render_limit`. This times, per row, with the real Qwen2 vocabulary and the bundled
`chatml` template on a 461-token conversation: TRL's `_tokenize` alone, the same call bounded as
check-data makes it, and the bounds alone (entering and leaving the budget, the size check). Each figure
is the best of `--repeats` loops of `--rows` calls, the two tokenize variants interleaved.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time

from trl.data_utils import _tokenize

from sft_toolkit import masks, offline_tokenizers
from sft_toolkit.templates import load_template


def conversation() -> list[dict]:
    messages = [{"role": "system", "content": "You are a patient maths tutor."}]
    for i in range(3):
        messages += [{"role": "user", "content": f"Question {i}: what is {i} times {i + 3}? Explain each step. " * 3},
                     {"role": "assistant", "content": f"{i} x {i + 3} = {i * (i + 3)}. Indeed. " * 8}]
    return messages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    tokenizer = offline_tokenizers.load("qwen2")
    template = load_template("chatml").source
    messages = conversation()

    def plain():
        return _tokenize(tokenizer, messages, return_assistant_tokens_mask=True, chat_template=template)

    def bounded():
        with masks.render_budget("row 0"):
            out = plain()
        assert masks.over_render_limit(len(out["input_ids"]), messages, None, tokens=True) is None

    def bounds_only():
        with masks.render_budget("row 0"):
            pass
        masks.over_render_limit(len(plain_ids), messages, None, tokens=True)

    plain_ids = plain()["input_ids"]
    best = {"tokenize": float("inf"), "tokenize, bounded": float("inf"), "bounds alone": float("inf")}
    calls = {"tokenize": plain, "tokenize, bounded": bounded, "bounds alone": bounds_only}
    for fn in calls.values():  # warm-up
        for _ in range(200):
            fn()
    for _ in range(args.repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            for _ in range(args.rows):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / args.rows * 1e6)

    print(f"`python {' '.join(shlex.quote(a) for a in sys.argv)}` ({platform.processor() or platform.machine()}, "
          f"{len(plain_ids)} tokens per row)\n")
    print("| per row | µs | vs. tokenize |\n|---|---:|---:|")
    for name, micros in best.items():
        print(f"| {name} | {micros:.1f} | {micros / best['tokenize'] * 100:.1f}% |")


if __name__ == "__main__":
    main()
