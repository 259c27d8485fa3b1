"""Benchmark: what the render bounds cost a normal row, and what one large row costs (time, memory per character).

    python benchmarks/render_bounds.py [--rows 2000] [--repeats 5]      # per-row cost of the bounds
    python benchmarks/render_bounds.py --large 2000000                  # one row of that many characters

Every chat-template render runs in `masks.BoundedSandbox` (transformers compiles templates in it): a timer
for time and memory, and size checks in jinja's sandbox hooks (`+`, `*`, `~`, filters, printed values). The
first mode times, per row, with the real Qwen2 vocabulary and the bundled `chatml` template on a 461-token
conversation: TRL's `_tokenize` with transformers' own (unbounded) environment, the same call in the bounded
one, the render alone in each, and the budget alone (entering and leaving it, one memory reading). Each
figure is the best of `--repeats` loops of `--rows` calls, the variants taking turns every `--rows`/20 calls.

The second mode measures, in a fresh process for each step, with the peak resident memory reset at its start,
one conversation with an assistant message of `--large` characters: the render alone, and check-data's
tokenization of the row (`preprocess._tokenize_row`, the tokenizer outside the render budget). It prints
seconds and the peak growth of resident memory per input character; `preprocess.MAX_ROW_CHARS` bounds the
rows that get tokenized at all.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import subprocess
import sys
import time


def conversation() -> list[dict]:
    messages = [{"role": "system", "content": "You are a patient maths tutor."}]
    for i in range(3):
        messages += [
            {"role": "user", "content": f"Question {i}: what is {i} times {i + 3}? Explain each step. " * 3},
            {"role": "assistant", "content": f"{i} x {i + 3} = {i * (i + 3)}. Indeed. " * 8},
        ]
    return messages


def large_conversation(chars: int) -> list[dict]:
    words = "The quick brown fox jumps over the lazy dog, again and again. "
    return [
        {"role": "user", "content": "Summarise the report."},
        {"role": "assistant", "content": (words * (chars // len(words) + 1))[:chars]},
    ]


def per_row(args) -> None:
    import jinja2.sandbox
    from transformers.utils import chat_template_utils
    from trl.data_utils import _tokenize

    from sft_toolkit import masks, offline_tokenizers
    from sft_toolkit.templates import load_template

    tokenizer = offline_tokenizers.load("qwen2")
    bounded_template = load_template("chatml").source
    # The same template under another cache key, compiled once in transformers' own environment.
    plain_template = bounded_template + "{#- unbounded #}"
    chat_template_utils.ImmutableSandboxedEnvironment = jinja2.sandbox.ImmutableSandboxedEnvironment
    chat_template_utils._compile_jinja_template(plain_template)
    chat_template_utils.ImmutableSandboxedEnvironment = masks.BoundedSandbox
    assert not isinstance(
        chat_template_utils._compile_jinja_template(plain_template).environment, masks.BoundedSandbox
    )
    assert isinstance(chat_template_utils._compile_jinja_template(bounded_template).environment, masks.BoundedSandbox)
    messages = conversation()

    def tokenize(template):
        return lambda: _tokenize(tokenizer, messages, return_assistant_tokens_mask=True, chat_template=template)

    def render(template):
        return lambda: chat_template_utils.render_jinja_template(
            conversations=[messages], chat_template=template, return_assistant_tokens_mask=True
        )

    def budget_alone():
        with masks.render_budget():
            pass

    calls = {
        "tokenize, transformers' environment": tokenize(plain_template),
        "tokenize, bounded environment": tokenize(bounded_template),
        "render, transformers' environment": render(plain_template),
        "render, bounded environment": render(bounded_template),
        "budget alone (timer, memory reading)": budget_alone,
    }
    assert tokenize(plain_template)() == tokenize(bounded_template)()
    ids = tokenize(bounded_template)()["input_ids"]
    best = dict.fromkeys(calls, float("inf"))
    for fn in calls.values():  # warm-up
        for _ in range(200):
            fn()
    block = max(1, args.rows // 20)  # variants take turns every `block` calls: load from other processes hits all
    for _ in range(args.repeats):
        spent = dict.fromkeys(calls, 0.0)
        for _ in range(args.rows // block):
            for name, fn in calls.items():
                start = time.perf_counter()
                for _ in range(block):
                    fn()
                spent[name] += time.perf_counter() - start
        for name in calls:
            best[name] = min(best[name], spent[name] / (args.rows // block * block) * 1e6)

    base = best["tokenize, transformers' environment"]
    print(
        f"`python {' '.join(shlex.quote(a) for a in sys.argv)}` ({platform.processor() or platform.machine()}, "
        f"{len(ids)} tokens per row)\n"
    )
    print("| per row | µs | vs. tokenize (transformers' environment) |\n|---|---:|---:|")
    for name, micros in best.items():
        print(f"| {name} | {micros:.1f} | {micros / base * 100:.1f}% |")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def large_step(step: str, chars: int) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    from sft_toolkit import masks, offline_tokenizers, preprocess
    from sft_toolkit.templates import load_template

    tokenizer = offline_tokenizers.load("qwen2")
    template = load_template("chatml").source
    masks.render(template, conversation())  # compile and warm up outside the measurement
    messages = large_conversation(chars)
    with open("/proc/self/clear_refs", "w") as f:  # start the peak (ru_maxrss) again from here: Linux >= 4.0
        f.write("5")
    before = _rss()
    start = time.perf_counter()
    if step == "render":
        masks.render(template, messages)
        tokens = None
    else:
        out = preprocess._tokenize_row({"messages": messages}, 0, tokenizer, template, True, max_row_chars=2 * chars)
        assert not out["reason"] and not out["problem"], out["reason"] or out["problem"]
        tokens = len(out["input_ids"])
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"step": step, "seconds": seconds, "bytes_per_char": grown / chars, "tokens": tokens}))


def large(args) -> None:
    rows = []
    for step in ("render", "tokenize"):
        out = subprocess.run(
            [sys.executable, __file__, "--step", step, "--large", str(args.large)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"`python {' '.join(shlex.quote(a) for a in sys.argv)}` ({platform.processor() or platform.machine()}, "
        f"one assistant message of {args.large:,} characters, Qwen2 vocabulary, `chatml`)\n"
    )
    print("| step | seconds | peak memory growth, bytes per input character | tokens |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['step']} | {row['seconds']:.2f} | {row['bytes_per_char']:.1f} | {row['tokens'] or ''} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large", type=int, help="measure one row of this many characters instead")
    parser.add_argument("--step", choices=("render", "tokenize"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        large_step(args.step, args.large)
    elif args.large:
        large(args)
    else:
        per_row(args)


if __name__ == "__main__":
    main()
