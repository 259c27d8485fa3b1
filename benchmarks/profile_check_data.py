"""Where check-data's tokenizing time goes: each step of a chat row's preparation timed on its own, in one process.

    python benchmarks/profile_check_data.py --rows 2000                 # the step table
    python benchmarks/profile_check_data.py --rows 2000 --cprofile 25   # plus cProfile's top functions of check_data
    python benchmarks/profile_check_data.py --rows 5000 --batch-stages  # the batch path (`_tokenize_rows`) by stage

The rows are `benchmarks/check_data.py`'s synthetic conversations (same seed), the Qwen2 vocabulary, the bundled
`chatml` template, `assistant_only_loss: true`, `max_length: 1024`, no packing. Each step runs over every row (a
Python loop, or one batch call where it says so), best of `--repeat` runs, in CPU seconds per 1000 rows, so the
figures add up to about what one `Dataset.map` pass costs and a shared machine's load shows less.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="also print cProfile's top N functions")
    parser.add_argument(
        "--batch-stages",
        action="store_true",
        help="instead: the batch path's stages, 1000-row batches as `Dataset.map` hands them (one pass each)",
    )
    args = parser.parse_args(argv)
    if args.batch_stages:
        batch_stages(args.rows)
        return

    import warnings

    warnings.filterwarnings("ignore")
    import datasets
    from check_data import _recipe_keys, write_dataset
    from transformers.utils.chat_template_utils import render_jinja_template
    from trl.data_utils import _tokenize

    from sft_toolkit import preprocess
    from sft_toolkit.check_data import check_data
    from sft_toolkit.recipe import build_recipe

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tmp = Path(tempfile.mkdtemp(prefix="profile-"))
    data = tmp / "rows.jsonl"
    write_dataset(data, args.rows)
    recipe = build_recipe(_recipe_keys(str(data), "no packing", None, str(tmp / "out")))
    tokenizer = preprocess.load_tokenizer_for(recipe)
    template = tokenizer.chat_template
    raw = datasets.load_dataset("json", data_files=str(data), split="train")
    rows = raw.to_list()
    special = dict(tokenizer.special_tokens_map)
    texts = [render_jinja_template([r["messages"]], chat_template=template, **special)[0][0] for r in rows]
    fn_kwargs = {
        "tokenizer": tokenizer,
        "template": None,
        "assistant_only_loss": True,
        "max_row_chars": preprocess.MAX_ROW_CHARS,
    }
    tokenized = [preprocess._tokenize_row(r, i, **fn_kwargs) for i, r in enumerate(rows)]

    steps = [
        (
            "load .jsonl into Arrow (datasets.load_dataset)",
            lambda: datasets.load_dataset("json", data_files=str(data), split="train"),
        ),
        ("Arrow -> Python dicts (what map hands the function)", lambda: raw.to_list()),
        (
            "row checks (row_problem, text_chars, canonical_messages)",
            lambda: [
                (
                    preprocess.row_problem(r),
                    preprocess.text_chars(r["messages"]),
                    preprocess.canonical_messages(r["messages"]),
                )
                for r in rows
            ],
        ),
        (
            "render with generation spans (render_jinja_template)",
            lambda: [
                render_jinja_template(
                    [r["messages"]], chat_template=template, return_assistant_tokens_mask=True, **special
                )
                for r in rows
            ],
        ),
        (
            "tokenize one row at a time (tokenizer(text, offsets))",
            lambda: [tokenizer(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts],
        ),
        (
            "tokenize in one batch call (tokenizer(texts, offsets))",
            lambda: tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True),
        ),
        (
            "apply_chat_template(return_assistant_tokens_mask) per row (TRL's tokenize)",
            lambda: [_tokenize(tokenizer, r["messages"], return_assistant_tokens_mask=True) for r in rows],
        ),
        (
            "content coverage per row (a second render + search)",
            lambda: [preprocess._coverage(tokenizer, None, None, r, r["messages"], None) for r in rows],
        ),
        (
            "labels + n_trainable/span in Python (per row)",
            lambda: [
                preprocess._trainable_and_span([t if m else -100 for t, m in zip(o["input_ids"], o["labels"])])
                for o in tokenized
            ],
        ),
        (
            "check-data's whole row function (_tokenize_row, per row)",
            lambda: [preprocess._tokenize_row(r, i, **fn_kwargs) for i, r in enumerate(rows)],
        ),
        (
            "Python rows -> Arrow (datasets.Dataset.from_list of the outputs)",
            lambda: datasets.Dataset.from_list(tokenized),
        ),
        ("check_data(recipe), end to end", lambda: check_data(recipe)),
    ]
    print(
        f"{args.rows} rows, {sum(len(o['input_ids']) for o in tokenized) / len(rows):.0f} tokens a row; CPU s "
        f"per 1000 rows, best of {args.repeat}:\n"
    )
    print("| step | CPU s / 1000 rows |\n|---|---:|")
    for name, fn in steps:
        seconds = _best(fn, args.repeat)
        print(f"| {name} | {seconds * 1000 / args.rows:.3f} |", flush=True)
    if args.cprofile:
        profile = cProfile.Profile()
        profile.runcall(check_data, recipe)
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.cprofile)
        print("\ncProfile of check_data(recipe), by own time:\n\n```\n" + out.getvalue().strip() + "\n```")


def batch_stages(n: int) -> None:
    """CPU ms per row of each stage of `preprocess._tokenize_rows` (the chat rows' batch path), over `n` rows in
    1000-row batches, then the whole tokenize map and `check_data` end to end (no packing) for comparison."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    import datasets
    from check_data import _recipe_keys, write_dataset
    from transformers.utils.chat_template_utils import render_jinja_template

    from sft_toolkit import coverage, masks, preprocess
    from sft_toolkit import policy as control
    from sft_toolkit.check_data import check_data
    from sft_toolkit.recipe import build_recipe

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tmp = Path(tempfile.mkdtemp(prefix="profile-"))
    data = tmp / "rows.jsonl"
    write_dataset(data, n)
    recipe = build_recipe(_recipe_keys(str(data), "no packing", None, str(tmp / "out")))
    tokenizer = preprocess.load_tokenizer_for(recipe)
    raw = datasets.load_dataset("json", data_files=str(data), split="train")
    special, policy, seconds = tokenizer.special_tokens_map, control.TurnPolicy(), {}

    def clock(name, fn):
        start = time.process_time()
        result = fn()
        seconds[name] = seconds.get(name, 0.0) + time.process_time() - start
        return result

    def checks(rows):
        for row in rows:
            preprocess.row_problem(row)
            preprocess.text_chars(row["messages"])
            messages = preprocess.canonical_messages(row["messages"])
            preprocess.has_text_parts(messages)
            control.needs_control(messages, policy)
            yield messages

    def render(conversations):
        return [
            render_jinja_template(
                conversations=[masks.normalize_messages(m)],
                chat_template=tokenizer.get_chat_template(None, None),
                return_assistant_tokens_mask=True,
                **special,
            )
            for m in conversations
        ]

    for start in range(0, n, 1000):
        batch = clock("Arrow -> Python (the batch's columns)", lambda: raw[start : start + 1000])
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        conversations = clock("row checks (row_problem, text_chars, canonical, control)", lambda: list(checks(rows)))
        rendered = clock("render with generation spans (render_jinja_template)", lambda: render(conversations))
        texts = [texts[0] for texts, _ in rendered]
        spans = [[tuple(span) for span in found[0]] for _, found in rendered]
        encoded = clock("the tokenizer (one encode_batch)", lambda: preprocess._encodings(tokenizer, texts))
        preprocess.CHECK_COVERAGE = False
        items = [(k, m, t, s) for k, (m, t, s) in enumerate(zip(conversations, texts, spans))]
        table = clock(
            "ids, mask (at the spans' edges), labels, counts, reasons -> Arrow table (_chat_table)",
            lambda: preprocess._chat_table(
                len(rows),
                list(range(len(rows))),
                {},
                items,
                encoded,
                masks.offsets_in_order(tokenizer.backend_tokenizer),
            ),
        )
        preprocess.CHECK_COVERAGE = True
        clock(
            "content coverage (coverage_problems, the same render's spans)",
            lambda: [coverage.coverage_problems(t, s, m) for t, s, m in zip(texts, spans, conversations)],
        )
        clock("Arrow table -> datasets.Dataset", lambda: datasets.Dataset(table))
    print(f"{n} rows; CPU ms per row:\n\n| stage | CPU ms / row |\n|---|---:|")
    for name, value in seconds.items():
        print(f"| {name} | {value * 1000 / n:.3f} |")
    print(f"| sum of the stages | {sum(seconds.values()) * 1000 / n:.3f} |")
    fn_kwargs = {"tokenizer": tokenizer, "template": None, "assistant_only_loss": True, "policy": policy}
    start = time.process_time()
    raw.map(
        preprocess._tokenize_rows,
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=preprocess._chat_features(),
        fn_kwargs=fn_kwargs,
    )
    print(f"| the whole tokenize map (Dataset.map(_tokenize_rows)) | {(time.process_time() - start) * 1000 / n:.3f} |")
    start = time.process_time()
    check_data(recipe)
    print(f"| check_data(recipe), end to end | {(time.process_time() - start) * 1000 / n:.3f} |")


if __name__ == "__main__":
    main()
