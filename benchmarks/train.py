"""Training throughput: no packing vs bfd packing on the same data, and what the mask guard costs.

    python benchmarks/train.py --model tiny --steps 30            # CPU, the quickstart's tiny model
    python benchmarks/train.py --model qwen2.5-0.5b --steps 30    # GPU, Qwen2.5-0.5B's shape, random weights

For each configuration it trains `--steps` optimizer steps after `--warmup` untimed ones and prints one
table: tokens/s (real tokens, padding excluded), trainable (assistant) tokens/s, the padding fraction of
the batches, and the step time of TRL's plain SFTTrainer vs the guarded trainer (guard overhead) on the
identical dataset and seed (after a throwaway warm-up run; each trainer runs twice, alternating, and
keeps its faster run). With packing it also runs the packing-isolation probe the guard uses. Weights are random: throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sft_toolkit import offline_tokenizers  # noqa: E402
from sft_toolkit.check_data import check_data  # noqa: E402
from sft_toolkit.recipe import build_recipe  # noqa: E402
from sft_toolkit.train import guarded_trainer_class, prepared_trainer_args  # noqa: E402

WORDS = (
    "the model learns only what the assistant says while user system and tool text stays context "
    "packing keeps sequences apart when position ids reset at each boundary so nothing leaks"
).split()


def conversations(n: int, seed: int, mean_words: int) -> list[dict]:
    rng = random.Random(seed)

    def text(scale: float) -> str:
        k = max(3, int(rng.lognormvariate(0, 0.8) * mean_words * scale))
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": text(0.3)}] if rng.random() < 0.3 else []
        for _ in range(rng.choice((1, 1, 2, 3))):
            messages += [{"role": "user", "content": text(0.6)}, {"role": "assistant", "content": text(1.0)}]
        rows.append({"messages": messages})
    return rows


def build_model_dir(kind: str, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    if kind == "tiny":
        from sft_toolkit.assets import build_quickstart_assets

        return build_quickstart_assets(folder / "assets")["model"]
    tokenizer = offline_tokenizers.load("qwen2")
    config = Qwen2Config(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out = folder / "qwen2.5-0.5b-shape"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class StepTimer(TrainerCallback):
    """Each step's seconds from the end of the previous step to the end of this one, so the batch fetch and the
    guard's per-step count are inside it (transformers calls `get_batch_samples` before `on_step_begin`)."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.last = warmup, [], None

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if state.global_step > self.warmup and self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def measure(keys: dict, guarded: bool, warmup: int, steps: int) -> dict:
    from trl import SFTTrainer

    recipe = build_recipe({**keys, "max_steps": warmup + steps})
    report, dataset = check_data(recipe)
    sft = prepared_trainer_args(recipe)
    from sft_toolkit.preprocess import load_tokenizer_for

    cls = guarded_trainer_class() if guarded else SFTTrainer
    timer = StepTimer(warmup)
    trainer = cls(
        model=keys["model_name_or_path"],
        args=sft,
        train_dataset=dataset,
        processing_class=load_tokenizer_for(recipe),
        callbacks=[timer],
    )
    # The batches this run sees (same seed, same sampler): count real, padded and trainable tokens.
    real = padded = trainable = 0
    for i, batch in enumerate(trainer.get_train_dataloader()):
        if i >= (warmup + steps) * sft.gradient_accumulation_steps:
            break
        if warmup * sft.gradient_accumulation_steps <= i:
            mask = batch.get("attention_mask")
            real += int(mask.sum()) if mask is not None else int((batch["position_ids"] >= 0).sum())
            padded += batch["input_ids"].numel()
            trainable += int((batch["labels"] != -100).sum())
    isolation = None
    if guarded and trainer.padding_free:
        from sft_toolkit.train import packing_isolation

        isolation = (packing_isolation(trainer), packing_isolation(trainer, use_cache=True))
    trainer.train()
    seconds = sum(timer.times)
    return {
        "step_s": seconds / max(len(timer.times), 1),
        "tokens_per_s": real / seconds,
        "trainable_per_s": trainable / seconds,
        "padding": 1 - real / padded,
        "sequences": report.sequences,
        "isolation": isolation,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("tiny", "qwen2.5-0.5b"), default="tiny")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--attn", default="sdpa")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp())
    model_dir = build_model_dir(args.model, folder)
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(args.rows, 0, 40)))
    gpu = torch.cuda.is_available()
    base = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(data),
        "chat_template_path": "chatml",
        "assistant_only_loss": True,
        "max_length": args.max_length,
        "per_device_train_batch_size": args.batch,
        "learning_rate": 1e-4,
        "logging_steps": 1000,
        "save_strategy": "no",
        "seed": 0,
        "bf16": gpu,
        "use_cpu": not gpu,
        "attn_implementation": args.attn,
        "output_dir": str(folder / "out"),
        "dataloader_num_workers": 0,
    }
    configs = [("no packing", {"packing": False}), ("bfd packing", {"packing": True, "packing_strategy": "bfd"})]
    device = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"# {' '.join(sys.argv)}\n# model {args.model}, {args.rows} rows, batch {args.batch}, max_length "
        f"{args.max_length}, attn {args.attn}, {args.steps} timed steps after {args.warmup}, on {device}"
    )
    print("| config | trainer | step s | tokens/s | trainable tokens/s | padding |")
    print("|---|---|---|---|---|---|")
    for name, extra in configs:
        # The first run in a process pays for kernel warm-up and caches; a throwaway run absorbs it, then the
        # plain and guarded trainers alternate (plain, guarded, plain, guarded) and each keeps its faster run.
        measure({**base, **extra}, False, args.warmup, 2)
        runs = {False: [], True: []}
        for guarded in (False, True, False, True):
            runs[guarded].append(measure({**base, **extra}, guarded, args.warmup, args.steps))
        results = {g: min(rs, key=lambda r: r["step_s"]) for g, rs in runs.items()}
        results[True]["isolation"] = runs[True][0]["isolation"]
        for guarded, r in results.items():
            print(
                f"| {name} | {'guarded' if guarded else 'plain TRL'} | {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | "
                f"{r['trainable_per_s']:.0f} | {r['padding']:.1%} |",
                flush=True,
            )
        overhead = results[True]["step_s"] / results[False]["step_s"] - 1
        print(f"| {name} | guard overhead | {overhead:+.1%} | | | |", flush=True)
        if results[True]["isolation"]:
            clean, leaky = results[True]["isolation"]
            print(
                f"# packing isolation probe ({args.attn}): max |logit diff| packed vs alone = {clean:.3g} "
                f"(use_cache=False, the training forward), {leaky:.3g} with use_cache=True",
                flush=True,
            )


if __name__ == "__main__":
    main()
