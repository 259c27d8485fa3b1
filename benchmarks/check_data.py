"""Benchmark: `check_data(recipe)` against TRL's own dataset preparation, on the same synthetic data.

    python benchmarks/check_data.py                       # 10k and 100k rows, no packing and bfd packing
    python benchmarks/check_data.py --sizes 2000 --num-proc 2
    python benchmarks/check_data.py --sizes 100000 300000   # linearity: 300k rows (161M tokens) take 4-8 minutes
                                                            # a side on 2 quiet cores and ~10 GB of temp disk
    python benchmarks/check_data.py --sizes 2000 --configs "no packing" --coverage-cost 5   # the coverage check

What is measured, per dataset size and configuration (real Qwen2 vocabulary, bundled `chatml` template,
`assistant_only_loss: true`, `max_length: 1024`, no packing / `packing: true, packing_strategy: bfd`):

* check-data: `sft_toolkit.check_data.check_data(recipe)`, end to end (tokenizer load, .jsonl check and
  load, tokenization with accounting, truncation or packing, every accounting pass).
* prepare: `sft_toolkit.prepare.prepare(recipe, DIR)`, end to end (the guard, here `mask_guard: warn`, with each
  token's provenance kept, `save_to_disk`, the manifest); `--sides` picks which of the two run beside TRL.
* TRL: what a user of `SFTTrainer` runs for the same data: load the tokenizer and set the template, load
  the .jsonl with `datasets`, then `SFTTrainer._prepare_dataset`, called directly with a minimal stand-in
  for the trainer (`_tokenizer`, `chat_template`, `completion_only_loss`, set as `SFTTrainer.__init__` does).

Each measured call runs in a fresh subprocess (so `ru_maxrss` is that call's own peak) with a fresh
`HF_DATASETS_CACHE` and `datasets.disable_caching()`, so neither side reuses the other's Arrow conversion
or cached maps. Imports happen before the clock starts and are the same on both sides. Afterwards, out of
the clock, both sides' final datasets are counted (sequences and trainable tokens) and must agree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "no packing": {"packing": False},
    "packing bfd": {"packing": True, "packing_strategy": "bfd"},
}
COMMON = {"assistant_only_loss": True, "max_length": 1024, "chat_template_path": "chatml"}
SEED = 1234
SIDES = ("trl", "check-data", "prepare")

# ---------------------------------------------------------------------------------------------- data

WORDS = """
the a an of to in and or but for with on at by from as is are was were be been being have has had do does
did will would can could should may might must shall not no yes this that these those it its they them
their we our you your he she his her i me my model data train training token tokens sequence batch loss
gradient learning rate step steps epoch layer layers attention head heads weight weights bias vector
matrix tensor function value values result results number numbers list table row rows column columns file
files path folder code program python script error errors warning bug fix test tests check output input
question answer example examples explain explanation reason because therefore however although while
first second third next then finally before after during between under over above below into through
simple complex small large fast slow good better best bad worse worst new old same different important
useful possible likely common rare often always never sometimes usually quickly carefully clearly
compute memory disk network server client request response user assistant system message messages prompt
template chat conversation turn turns length short long word words sentence paragraph text document page
read write open close start stop run build install update remove add change keep use make take give find
show tell ask know think want need try help work call return print load save send receive create delete
history science math physics chemistry biology language music art city country river mountain ocean
weather summer winter morning evening today tomorrow yesterday week month year time hour minute second
people person team company market price cost money bank account order product customer service support
recipe cook bake oven flour sugar salt water milk egg butter onion garlic tomato pepper cheese bread rice
health sleep exercise doctor patient study school student teacher class lesson book story chapter author
""".split()
PUNCT = [".", ".", ".", ",", ",", "?", "!", ":", ";"]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in as few words as possible.",
    "You are an expert programmer. Explain code step by step and show examples.",
    "You are a patient tutor for high-school mathematics and physics.",
    "You are a customer support agent for an online shop. Be polite and precise.",
]


def _text(rng: random.Random, mu: float, sigma: float, cap: int) -> str:
    """Log-normal number of words (median e^mu), sentences of 5-25 words, the odd number or code line."""
    n = max(1, min(cap, int(rng.lognormvariate(mu, sigma))))
    out, sentence = [], 0
    goal = rng.randint(5, 25)
    for _ in range(n):
        r = rng.random()
        word = str(rng.randint(0, 10_000)) if r < 0.03 else rng.choice(WORDS)
        out.append(word.capitalize() if sentence == 0 else word)
        sentence += 1
        if sentence >= goal:
            out[-1] += rng.choice(PUNCT)
            if rng.random() < 0.08:
                out[-1] += "\n\n" if rng.random() < 0.7 else "\n```python\nx = compute(data)\nprint(x)\n```\n"
            sentence, goal = 0, rng.randint(5, 25)
    return " ".join(out).replace("\n ", "\n") + "."


def conversation(rng: random.Random) -> dict:
    """1-4 turns, a system prompt in ~30% of rows; every assistant message has content (plain TRL aborts
    on a row without assistant tokens)."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.choices([1, 2, 3, 4], weights=[50, 25, 15, 10])[0]):
        messages.append({"role": "user", "content": _text(rng, math.log(35), 1.0, 2500)})
        messages.append({"role": "assistant", "content": _text(rng, math.log(110), 0.9, 3000)})
    return {"messages": messages}


def write_dataset(path: Path, n: int, seed: int = SEED) -> None:
    rng = random.Random(seed)  # the 10k file is the first 10k rows of the 100k one
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(conversation(rng)) + "\n")


# ------------------------------------------------------------------------------- one measured call


def _recipe_keys(data: str, config: str, num_proc: int | None, output_dir: str) -> dict:
    from sft_toolkit import offline_tokenizers

    return {
        "model_name_or_path": str(offline_tokenizers.cached("qwen2")),
        "dataset_name": data,
        "output_dir": output_dir,
        "dataset_num_proc": num_proc,
        **COMMON,
        **CONFIGS[config],
    }


def _rss_mib(who) -> float:
    import resource

    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def _counts(dataset) -> tuple[int, int]:
    """Sequences and trainable tokens (labels != -100) of a prepared dataset, with Arrow, out of the clock."""
    import pyarrow.compute as pc

    labels = dataset.with_format("arrow")[:]["labels"] if len(dataset) else None
    trainable = 0 if labels is None else int(pc.sum(pc.not_equal(pc.list_flatten(labels), -100)).as_py() or 0)
    return len(dataset), trainable


PHASE_NAMES = {  # map/filter descriptions (TRL's end in " train dataset") -> one name for both sides
    "Tokenizing": "tokenize (map)",
    "Building labels for": "build labels (map)",
    "Truncating": "truncate (map)",
    "Dropping fully masked examples": "drop fully masked (filter)",
    "Dropping fully masked examples from": "drop fully masked (filter)",
    "Tagging tokens": "tag src_row/src_pos (map)",
    "Packing": "pack bfd (map)",
}


PHASE_ORDER = [
    "load tokenizer",
    "load .jsonl",
    "tokenize (map)",
    "build labels (map)",
    "accounting: per-row stats",
    "truncate (map)",
    "accounting: truncation",
    "drop fully masked (filter)",
    "tag src_row/src_pos (map)",
    "pack bfd (map)",
    "accounting: packed sequences",
    "accounting: zero rows",
    "accounting: optimizer steps",
    "prepare: manifest",
    "prepare: save_to_disk",
]
OTHER = "other (select/shuffle/glue)"


def _rss_now() -> tuple[float, float]:
    """(RssAnon, RssFile) of this process in MiB: heap vs. file pages mapped in (datasets mmaps its Arrow files)."""
    anon = file = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) / 1024
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) / 1024
    return anon, file


class Phases:
    """Wall time and memory per phase: outermost Dataset.map/filter calls by description, plus named functions.

    A wrapper costs two clock reads per call; nested calls (filter runs a map) count once, in the outer one.
    A sampler thread reads /proc/self/status every 20 ms and keeps, per phase, the largest RSS (anonymous +
    file-backed) and the largest anonymous RSS seen while it ran."""

    def __init__(self):
        import threading

        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # user+sys seconds of the process, its threads and its finished workers
        self.max_rss: dict[str, float] = {}
        self.max_anon: dict[str, float] = {}
        self.current = OTHER
        self._depth = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        while not self._stop.wait(0.02):
            self._record(self.current)

    def _record(self, label: str) -> None:
        anon, file = _rss_now()
        self.max_rss[label] = max(self.max_rss.get(label, 0.0), anon + file)
        self.max_anon[label] = max(self.max_anon.get(label, 0.0), anon)

    @contextlib.contextmanager
    def span(self, label: str):
        self._depth += 1
        self.current = label
        start, cpu = time.perf_counter(), _cpu_seconds()
        try:
            yield
        finally:
            self._record(label)
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
            self.cpu[label] = self.cpu.get(label, 0.0) + _cpu_seconds() - cpu
            self._depth -= 1
            self.current = OTHER

    def wrap(self, owner, attr: str, name: str | None = None, by_desc: bool = False) -> None:
        original = getattr(owner, attr)
        phases = self

        def timed(*args, **kwargs):
            if phases._depth:
                return original(*args, **kwargs)
            label = name
            if by_desc:
                desc = (kwargs.get("desc") or "").removesuffix(" train dataset")
                label = PHASE_NAMES.get(desc, f"{attr}: {desc or '?'}")
            with phases.span(label):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(side: str, data: str, config: str, num_proc: int | None) -> dict:
    """Runs in a fresh subprocess (see main); HF_DATASETS_CACHE was pointed at an empty folder by the parent."""
    import resource
    import warnings

    warnings.filterwarnings("ignore")
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    from sft_toolkit.check_data import check_data
    from sft_toolkit.recipe import build_recipe
    from sft_toolkit.templates import load_template

    datasets.disable_caching()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    out_dir = tempfile.mkdtemp(prefix="bench-out-")
    keys = _recipe_keys(data, config, num_proc, out_dir)
    # Both sides get the same SFTConfig values; prepare saves what its guard warns about (a few generated rows
    # have every answer past max_length), as TRL trains them: rejecting or repairing would change the data.
    recipe = build_recipe({**keys, "mask_guard": "warn"} if side == "prepare" else keys)
    baseline = _rss_mib(resource.RUSAGE_SELF)

    phases = Phases()
    phases.wrap(datasets.Dataset, "map", by_desc=True)
    phases.wrap(datasets.Dataset, "filter", by_desc=True)
    if side in ("check-data", "prepare"):
        import sft_toolkit.check_data as cd
        import sft_toolkit.data
        import sft_toolkit.preprocess

        phases.wrap(sft_toolkit.preprocess, "load_tokenizer_for", "load tokenizer")
        phases.wrap(sft_toolkit.data, "load_rows", "load .jsonl")  # with check-data's line-by-line JSON check
        for fn, label in [
            ("_row_stats", "accounting: per-row stats"),
            ("_truncated_stats", "accounting: truncation"),
            ("_packed_stats", "accounting: packed sequences"),
            ("_zero_rows", "accounting: zero rows"),
            ("_steps", "accounting: optimizer steps"),
        ]:
            phases.wrap(cd, fn, label)
        if side == "prepare":
            import sft_toolkit.prepare

            phases.wrap(sft_toolkit.prepare, "build_manifest", "prepare: manifest")
            phases.wrap(sft_toolkit.prepare, "save", "prepare: save_to_disk")
        phases.start()
        cpu0, start = _cpu_seconds(), time.perf_counter()
        if side == "prepare":  # the guard with provenance kept, save_to_disk and the manifest
            from sft_toolkit.prepare import prepare

            prepared = prepare(recipe, Path(out_dir) / "prepared")
            report = prepared.report
        else:
            report, final = check_data(recipe)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
        if side == "prepare":
            final = datasets.load_from_disk(str(prepared.path / "dataset"))  # out of the clock, for the counts
        extra = {
            "report_sequences": report.sequences,
            "report_trainable_tokens": report.trainable_tokens,
            "report_ok": report.ok,
            "rows": report.rows,
            "dropped_rows": report.dropped_rows,
            "truncated_assistant_tokens": report.truncated_assistant_tokens,
        }
    else:
        args = SFTConfig(
            **{k: v for k, v in keys.items() if k not in ("model_name_or_path", "dataset_name", "chat_template_path")},
            use_cpu=True,
            report_to="none",
        )
        phases.start()
        cpu0, start = _cpu_seconds(), time.perf_counter()
        with phases.span("load tokenizer"):
            tokenizer = transformers.AutoTokenizer.from_pretrained(keys["model_name_or_path"])
            tokenizer.chat_template = load_template(keys["chat_template_path"]).source  # TRL reads a .jinja path
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        stand_in = argparse.Namespace(
            _tokenizer=tokenizer,
            # As SFTTrainer.__init__: TRL's training template only when the tokenizer's lacks generation markers.
            chat_template=(
                get_training_chat_template(tokenizer)
                if args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template)
                else None
            ),
            completion_only_loss=False,
        )
        with phases.span("load .jsonl"):  # as check-data does, minus its line-by-line JSON check
            raw = datasets.load_dataset("json", data_files=data, split="train")
        final = SFTTrainer._prepare_dataset(stand_in, raw, tokenizer, args, args.packing, None, "train")
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
        extra = {}
    peak_children = _rss_mib(resource.RUSAGE_CHILDREN)
    sequences, trainable = _counts(final)
    peak = _rss_mib(resource.RUSAGE_SELF)
    columns = final.column_names
    del final
    shutil.rmtree(out_dir, ignore_errors=True)  # this call's own mkdtemp: a 300k-row prepare saves gigabytes
    phases._record(OTHER)
    phases.stop()
    phases.seconds[OTHER] = seconds - sum(phases.seconds.values())
    phases.cpu[OTHER] = cpu - sum(phases.cpu.values())
    return {
        "side": side,
        "config": config,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "phases": phases.seconds,
        "phases_cpu": phases.cpu,
        "max_rss": phases.max_rss,
        "max_anon": phases.max_anon,
        "peak_anon_mib": max(phases.max_anon.values()),
        "baseline_rss_mib": baseline,
        "peak_rss_mib": peak,
        "peak_rss_children_mib": peak_children,
        "sequences": sequences,
        "trainable_tokens": trainable,
        "columns": columns,
        **extra,
    }


def run_measure(side: str, data: Path, config: str, num_proc: int | None, parallelism: str = "false") -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as cache:
        env = {
            **os.environ,
            "HF_DATASETS_CACHE": cache,
            "HF_HUB_OFFLINE": "1",
            "PYTHONWARNINGS": "ignore",
        }
        env.pop("TOKENIZERS_PARALLELISM", None)
        if parallelism != "default":  # "default": the tokenizers library decides (threads on every core)
            env["TOKENIZERS_PARALLELISM"] = parallelism
        cmd = [sys.executable, __file__, "_measure", "--side", side, "--data", str(data), "--config", config]
        if num_proc:
            cmd += ["--num-proc", str(num_proc)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"measurement failed ({side}, {config}, {data.name}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- driver


def coverage_cost(args) -> None:
    """check-data with and without the content coverage check (`preprocess.CHECK_COVERAGE`), the same data and
    recipe, interleaved in one process; datasets' cache off so every run tokenizes."""
    import statistics

    import datasets

    from sft_toolkit import preprocess
    from sft_toolkit.check_data import check_data
    from sft_toolkit.recipe import build_recipe

    datasets.disable_caching()
    with tempfile.TemporaryDirectory(prefix="bench-coverage-") as tmp:
        lines = []
        for n in args.sizes:
            data = Path(tmp) / f"conversations-{n}.jsonl"
            write_dataset(data, n)
            for config in args.configs:
                recipe = build_recipe(_recipe_keys(str(data), config, args.num_proc, str(Path(tmp) / "out")))
                seconds = {False: [], True: []}
                for _ in range(args.coverage_cost):
                    for on in (False, True):
                        preprocess.CHECK_COVERAGE = on
                        start = time.process_time()
                        report, _ = check_data(recipe)
                        seconds[on].append(time.process_time() - start)
                preprocess.CHECK_COVERAGE = True
                off, on = (min(seconds[k]) for k in (False, True))
                medians = [statistics.median(seconds[k]) for k in (False, True)]
                lines.append(
                    f"| {_human(n)} | {config} | {off:.2f} | {on:.2f} | {on / off - 1:+.1%} | "
                    f"{medians[0]:.2f} | {medians[1]:.2f} | {medians[1] / medians[0] - 1:+.1%} | "
                    f"{len(report.coverage_problem_rows)} |"
                )
    print(
        "| rows | config | without s (min) | with s (min) | cost (min) | without s (median) | with s (median) "
        "| cost (median) | coverage problem rows |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(lines)
        + f"\n\nCPU seconds of check_data(recipe) in one process, {args.coverage_cost} "
        "interleaved runs each."
    )


def _human(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="rows per dataset")
    parser.add_argument("--num-proc", type=int, default=None, help="dataset_num_proc for both sides (default: none)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--workdir", help="where to write the .jsonl files (default: a temp dir, removed)")
    parser.add_argument(
        "--sides", nargs="+", default=list(SIDES), choices=list(SIDES), help="what to measure (trl is always run)"
    )
    parser.add_argument(
        "--tokenizers-parallelism",
        choices=["false", "true", "default"],
        default="false",
        help="TOKENIZERS_PARALLELISM for every side (default: false, one thread; `default` leaves it unset)",
    )
    parser.add_argument(
        "--coverage-cost",
        type=int,
        metavar="REPEATS",
        help="instead: what the content coverage "
        "check adds to check-data, measured in one process, with and without it, interleaved REPEATS "
        "times (CPU seconds; a shared machine's noise swamps a 10%% difference between separate runs)",
    )
    args = parser.parse_args(argv)
    if args.coverage_cost:
        coverage_cost(args)
        return

    command = " ".join(["python benchmarks/check_data.py", *(shlex.quote(a) for a in (argv or sys.argv[1:]))])
    t0 = time.perf_counter()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench-data-")
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    from sft_toolkit import offline_tokenizers

    offline_tokenizers.cached("qwen2")  # build once, out of every clock

    results = {}
    for n in args.sizes:
        data = workdir / f"conversations-{n}.jsonl"
        write_dataset(data, n)
        print(f"# {n} rows -> {data} ({data.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr, flush=True)
        for config in args.configs:
            for side in ["trl", *(side for side in args.sides if side != "trl")]:
                r = run_measure(side, data, config, args.num_proc, args.tokenizers_parallelism)
                results[n, config, side] = r
                print(
                    f"#   {config:12s} {side:10s} {r['seconds']:7.1f} s  peak {r['peak_rss_mib']:6.0f} MiB  "
                    f"{r['sequences']} sequences, {r['trainable_tokens']} trainable tokens",
                    file=sys.stderr,
                    flush=True,
                )
            theirs = results[n, config, "trl"]
            for side in args.sides:
                if side == "trl":
                    continue
                ours = results[n, config, side]
                same = (ours["sequences"], ours["trainable_tokens"]) == (
                    theirs["sequences"],
                    theirs["trainable_tokens"],
                )
                same_report = (ours["report_sequences"], ours["report_trainable_tokens"]) == (
                    ours["sequences"],
                    ours["trainable_tokens"],
                )
                assert same, f"{n} rows, {config}: {side} {ours} != TRL {theirs}"
                assert same_report, f"{n} rows, {config}: the report disagrees with {side}'s own dataset: {ours}"

    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), Python "
        f"{platform.python_version()}, dataset_num_proc={args.num_proc}, max_length=1024, Qwen2 vocabulary, "
        "chatml template, assistant_only_loss",
        "",
        f"TOKENIZERS_PARALLELISM: {args.tokenizers_parallelism}",
        "",
        "| rows | config | side | TRL s | side s | time ratio (wall) | time ratio (CPU) | TRL peak RSS MiB "
        "| side peak RSS MiB | memory ratio | sequences | trainable tokens | same as TRL |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (n, config, side), r in results.items():
        if side == "trl":
            continue
        t = results[n, config, "trl"]
        lines.append(
            f"| {_human(n)} | {config} | {side} | {t['seconds']:.1f} | {r['seconds']:.1f} | "
            f"{r['seconds'] / t['seconds']:.2f} | {r['cpu_seconds'] / t['cpu_seconds']:.2f} | "
            f"{t['peak_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / t['peak_rss_mib']:.2f} | "
            f"{r['sequences']} | {r['trainable_tokens']} | yes |"
        )
    lines += [
        "",
        "ratio = side / TRL (issue 19's goal: time <= 0.5, memory <= 1.1); CPU = user+sys seconds of the measuring "
        "process, its threads and its workers (less sensitive than wall time to other load on the machine).",
    ]
    big = max(args.sizes)
    for config in args.configs:
        for side in (side for side in args.sides if side != "trl"):
            t, r = results[big, config, "trl"], results[big, config, side]
            names = [k for k in PHASE_ORDER if k in t["phases"] or k in r["phases"]]
            names += [k for k in {**t["phases"], **r["phases"]} if k not in names]  # unforeseen ones, "other" last
            lines += [
                "",
                f"Where the time and memory go, {_human(big)} rows, {config}, {side} (phases in the order they run; "
                "CPU = user+sys seconds of the process, its threads and the workers that finished in the phase; "
                "memory = largest RSS while the phase ran, sampled every 20 ms, with the anonymous (heap) part "
                "in brackets; the rest is file pages of mmapped Arrow files):",
                "",
                f"| phase | TRL s | TRL CPU s | {side} s | {side} CPU s | TRL RSS (anon) MiB | {side} RSS (anon) MiB |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for name in names:
                cells = [
                    f"{x[key][name]:.1f}" if name in x[key] else "-"
                    for x in (t, r)
                    for key in ("phases", "phases_cpu")
                ]
                mem = [
                    f"{x['max_rss'][name]:.0f} ({x['max_anon'][name]:.0f})" if name in x["max_rss"] else "-"
                    for x in (t, r)
                ]
                lines.append(f"| {name} | {' | '.join(cells)} | {mem[0]} | {mem[1]} |")
            lines.append(
                f"| **total** (peak: ru_maxrss; anon: sampled) | **{t['seconds']:.1f}** | **{t['cpu_seconds']:.1f}** "
                f"| **{r['seconds']:.1f}** | **{r['cpu_seconds']:.1f}** "
                f"| **{t['peak_rss_mib']:.0f} ({t['peak_anon_mib']:.0f})** "
                f"| **{r['peak_rss_mib']:.0f} ({r['peak_anon_mib']:.0f})** |"
            )
    if len(args.sizes) > 1:
        small, large = min(args.sizes), max(args.sizes)
        lines += ["", f"Growth from {_human(small)} to {_human(large)} rows (x{large / small:g} data):", ""]
        for config in args.configs:
            for side in ["trl", *(side for side in args.sides if side != "trl")]:
                a, b = results[small, config, side], results[large, config, side]
                lines.append(
                    f"- {config}, {side}: time x{b['seconds'] / a['seconds']:.2f}, peak RSS "
                    f"x{b['peak_rss_mib'] / a['peak_rss_mib']:.2f} ({a['peak_rss_mib']:.0f} -> "
                    f"{b['peak_rss_mib']:.0f} MiB; peak anonymous {a['peak_anon_mib']:.0f} -> "
                    f"{b['peak_anon_mib']:.0f} MiB; import baseline {b['baseline_rss_mib']:.0f} MiB)"
                )
    if args.num_proc and args.num_proc > 1:
        lines += ["", "With dataset_num_proc > 1 the maps run in worker processes; peak RSS of the largest worker:"]
        for (n, config, side), r in results.items():
            lines.append(f"- {_human(n)} {config} {side}: {r['peak_rss_children_mib']:.0f} MiB")
    lines += ["", f"Total benchmark wall time: {time.perf_counter() - t0:.0f} s"]
    print("\n".join(lines))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        p = argparse.ArgumentParser()
        p.add_argument("_measure")
        p.add_argument("--side", required=True, choices=SIDES)
        p.add_argument("--data", required=True)
        p.add_argument("--config", required=True, choices=list(CONFIGS))
        p.add_argument("--num-proc", type=int, default=None)
        a = p.parse_args()
        print(json.dumps(measure(a.side, a.data, a.config, a.num_proc)))
    else:
        main()
