"""The GPU runbook (issue #18): every figure the toolkit still owes from a GPU, in one run of a few minutes.

    benchmarks/gpu_suite.sh                      # on a CUDA machine: a Qwen2.5-0.5B-shaped model, random weights
    python benchmarks/gpu_suite.py --smoke       # on CPU in seconds: the tiny quickstart model, every CPU path

It exists so that a borrowed GPU is spent measuring, not writing scripts. On one run it measures:

- tokens/s for no packing, bfd padding-free with sdpa, and flash-attention varlen kernels when they import
  (the `flash_attn` package, or `kernels`, which fetches its kernel from the hub); each with TRL's plain
  SFTTrainer and the guarded trainer alternating in the same process, so the guard's overhead is read
  off the same run. A step is timed from the end of one step to the end of the next, which includes the
  batch fetch and the guard's count (transformers calls `get_batch_samples` before `on_step_begin`);
- the packing-isolation probe `train` runs before a padding-free run (`train.packing_isolation`), and its
  verdict, for each attention implementation that loads;
- a QLoRA smoke run through `train.train` when bitsandbytes imports;
- FSDP2 and DeepSpeed ZeRO-3 under `accelerate launch` over every visible GPU, with the shipped configs
  (`recipes/accelerate/`): the run trains and the loss falls, checkpoints are complete (no staging folder
  left), a run resumed from the middle checkpoint logs the uninterrupted run's losses, the final model
  loads with `from_pretrained`, and a step left with nothing to train on a rank stops every rank.

It writes OUT/results.json and OUT/results.md (date, device, command, versions and every figure) ready to
paste into benchmarks/README.md. A part that cannot run here says why ("skipped: no CUDA device", "not
installed"); it never reports a number it did not measure.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sft_toolkit.recipe import build_recipe  # noqa: E402
from sft_toolkit.train import (  # noqa: E402
    guard,
    guarded_trainer_class,
    isolation_tolerance,
    packing_isolation,
    prepared_trainer_args,
    quantization_missing,
)

ACCELERATE_CONFIGS = ROOT / "recipes" / "accelerate"
MEASURED, SKIPPED, FAILED = "measured", "skipped", "failed"
LAUNCHED_PARTS = ("fsdp2", "deepspeed_zero3", "qlora")
PARTS = ("throughput", "packing_isolation", *LAUNCHED_PARTS)
# Where accelerate 1.15 decides that an FSDP config is applied only on accelerator devices.
FSDP_ON_CPU = (
    "accelerate 1.15 applies FSDP only on accelerator devices (accelerate/state.py:986-1013); "
    "the CPU refusal is tested in tests/test_scale_out.py"
)


def _load_train_benchmark():
    """benchmarks/train.py's synthetic conversations and model builder (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("train_benchmark", Path(__file__).with_name("train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_benchmark = _load_train_benchmark()


def skipped(reason: str) -> dict:
    return {"status": SKIPPED, "reason": reason}


def failed(error: BaseException | str) -> dict:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"status": FAILED, "reason": text[-2000:]}


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class WallClock(TrainerCallback):
    """Seconds from the end of the warm-up steps to the end of the last step: everything a step costs."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize()
        if state.global_step == self.warmup:
            self.start = time.perf_counter()
        elif state.global_step > self.warmup:
            self.end, self.steps = time.perf_counter(), self.steps + 1


class Suite:
    def __init__(self, args: argparse.Namespace, folder: Path):
        self.args, self.folder = args, folder
        self.cuda = torch.cuda.is_available() and not args.smoke
        self.no_cuda = "no CUDA device" if not torch.cuda.is_available() else "--smoke runs on CPU"
        self.started = time.monotonic()
        self.data = folder / "train.jsonl"
        if args.model == "tiny":  # the quickstart's model, tokenizer and short conversations
            from sft_toolkit.assets import build_quickstart_assets

            assets = build_quickstart_assets(folder / "assets")
            self.model_dir = assets["model"]
            rows = [json.loads(line) for line in Path(assets["train"]).read_text().splitlines()[: args.rows]]
        else:  # Qwen2.5-0.5B's shape, random weights, the real Qwen vocabulary (offline)
            self.model_dir = train_benchmark.build_model_dir(args.model, folder)
            rows = train_benchmark.conversations(args.rows, 0, 40)
        self.data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        self.datasets = {}

    def over_budget(self) -> dict | None:
        spent = time.monotonic() - self.started
        return (
            skipped(f"the suite's time budget ({self.args.budget_s} s) was spent")
            if spent > self.args.budget_s
            else None
        )

    def keys(self, **extra) -> dict:
        return {
            "model_name_or_path": str(self.model_dir),
            "dataset_name": str(self.data),
            "chat_template_path": "chatml",
            "assistant_only_loss": True,
            "max_length": self.args.max_length,
            "per_device_train_batch_size": self.args.batch,
            "learning_rate": 1e-4,
            "logging_steps": 1000,
            "save_strategy": "no",
            "seed": 0,
            "bf16": self.cuda,
            "use_cpu": not self.cuda,
            "mask_guard": "warn",  # long synthetic rows may be cut: measured, not refused
            "output_dir": str(self.folder / "out"),
            "dataloader_num_workers": 0,
            **extra,
        }

    def dataset(self, keys: dict):
        """train's own preparation (provenance kept, as `train` keeps it), once per data-shaping setting."""
        shape = (keys.get("packing", False), keys.get("packing_strategy"))
        if shape not in self.datasets:
            dataset = guard(build_recipe(keys), keep_provenance=True).dataset
            self.datasets[shape] = dataset.remove_columns([c for c in ("src_pos",) if c in dataset.column_names])
        return self.datasets[shape]

    def trainer(self, keys: dict, guarded: bool, callbacks=(), count_from: int | None = None):
        """TRL's plain SFTTrainer or the guarded one on the prepared dataset; with `count_from`, it also counts
        the tokens of every micro-batch it trains from that step on (see `counting`)."""
        from trl import SFTTrainer

        from sft_toolkit.preprocess import load_tokenizer_for

        recipe = build_recipe(keys)
        dataset = self.dataset(keys)
        cls = guarded_trainer_class() if guarded else SFTTrainer
        if count_from is not None:
            cls = counting(cls, count_from)
        return cls(
            model=keys["model_name_or_path"],
            args=prepared_trainer_args(recipe),
            train_dataset=dataset,
            processing_class=load_tokenizer_for(recipe),
            callbacks=list(callbacks),
        )

    # -- tokens/s and guard overhead ---------------------------------------------------------------------------

    def run_once(self, keys: dict, guarded: bool, steps: int | None = None) -> dict:
        warmup, steps = self.args.warmup, steps or self.args.steps
        clock = WallClock(warmup)
        trainer = self.trainer({**keys, "max_steps": warmup + steps}, guarded, [clock], count_from=warmup)
        trainer.train()
        if clock.start is None or clock.end is None or clock.steps != steps:
            raise RuntimeError(f"timed {clock.steps} of {steps} steps (the dataset may be too small)")
        seconds = clock.end - clock.start
        real, padded, trainable = (int(count) for count in trainer.counted)
        del trainer
        if self.cuda:
            torch.cuda.empty_cache()
        return {
            "steps": steps,
            "seconds": seconds,
            "step_s": seconds / steps,
            "tokens": real,
            "tokens_per_s": real / seconds,
            "trainable_tokens": trainable,
            "trainable_tokens_per_s": trainable / seconds,
            "padding": 1 - real / padded,
        }

    def throughput(self, keys: dict) -> dict:
        """Plain and guarded trainers alternating in one process (plain, guarded, ... `repeats` times each);
        each keeps its fastest run. On a GPU a throwaway run first absorbs kernel warm-up."""
        if self.cuda and not self.datasets:
            self.run_once(keys, False, steps=2)
        runs = {False: [], True: []}
        for _ in range(self.args.repeats):
            for guarded in (False, True):
                runs[guarded].append(self.run_once(keys, guarded))
        plain, guarded = (min(runs[g], key=lambda r: r["step_s"]) for g in (False, True))
        return {
            "status": MEASURED,
            "plain": plain,
            "guarded": guarded,
            "guard_overhead": guarded["step_s"] / plain["step_s"] - 1,
            "runs_each": self.args.repeats,
        }

    def isolation(self, attn: str) -> dict:
        """The probe `train` runs before a padding-free run, on this model, for one attention implementation."""
        keys = self.keys(packing=True, packing_strategy="bfd", attn_implementation=attn, max_steps=1)
        trainer = self.trainer(keys, True)
        clean, cached = packing_isolation(trainer), packing_isolation(trainer, use_cache=True)
        tolerance = isolation_tolerance(trainer.model)
        del trainer
        return {
            "status": MEASURED,
            "training_forward_max_diff": clean,  # use_cache=False, the forward compute_loss makes
            "use_cache_max_diff": cached,
            "tolerance": tolerance,
            "verdict": "isolated" if clean <= tolerance else "leaks (train refuses packing)",
        }

    # -- QLoRA -----------------------------------------------------------------------------------------------

    def qlora(self) -> dict:
        if not self.cuda:
            missing = [m for m in quantization_missing() if "CUDA" not in m]
            return skipped(self.no_cuda + (f"; also missing {', '.join(missing)}" if missing else ""))
        missing = quantization_missing()
        if missing:
            return skipped(f"not installed: {', '.join(missing)}")
        from sft_toolkit.train import train

        keys = self.keys(
            load_in_4bit=True,
            use_peft=True,
            lora_r=16,
            lora_alpha=32,
            dtype="bfloat16",
            max_steps=10,
            logging_steps=1,
            output_dir=str(self.folder / "qlora"),
        )
        torch.cuda.reset_peak_memory_stats()
        started = time.monotonic()
        outcome = train(build_recipe(keys), log=lambda _: None)
        shutil.rmtree(self.folder / "qlora", ignore_errors=True)
        return {
            "status": MEASURED,
            "steps": len(outcome.history),
            "first_loss": outcome.history[0],
            "last_loss": outcome.history[-1],
            "seconds": time.monotonic() - started,
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        }

    # -- FSDP2 / DeepSpeed under accelerate launch -----------------------------------------------------------

    def launch(self, config: Path, recipe_keys: dict, name: str, launcher=(), env=None) -> subprocess.CompletedProcess:
        import yaml

        recipe = self.folder / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(recipe_keys))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", str(self.args.gpus), "--main_process_port", str(free_port()), *launcher,
               "--module", "sft_toolkit", "train", str(recipe)]  # fmt: skip
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        # A launch may run past the budget by a minute at most, so the suite ends under gpu_suite.sh's timeout.
        limit = max(60.0, self.args.budget_s + 60 - (time.monotonic() - self.started))
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=limit, env={**environment, **(env or {})}
            )
        except subprocess.TimeoutExpired as err:
            out = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
            error = err.stderr.decode() if isinstance(err.stderr, bytes) else err.stderr or ""
            proc = subprocess.CompletedProcess(cmd, 124, out, error + f"\n(stopped after {limit:.0f} s)")
        (self.folder / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        return proc

    def chain_keys(self, output_dir: Path, **extra) -> dict:
        chain = {
            "max_length": 512,
            "per_device_train_batch_size": 2,
            "max_steps": 6,
            "save_strategy": "steps",
            "save_steps": 3,
            "logging_steps": 1,
            "output_dir": str(output_dir),
        }
        return self.keys(**{**chain, **extra})

    def launched_chain(self, config: Path, name: str, launcher=()) -> dict:
        """Train 6 steps (checkpoints at 3 and 6), resume a copy of checkpoint-3 to step 6, load the final model."""
        full_dir, resumed_dir = self.folder / f"{name}-full", self.folder / f"{name}-resumed"
        proc = self.launch(config, self.chain_keys(full_dir), f"{name}-full", launcher)
        if proc.returncode != 0:
            return failed(f"exit {proc.returncode}: {proc.stderr[-1500:]}")
        losses = logged_losses(full_dir / "checkpoint-6")
        result = {
            "status": MEASURED,
            "losses": losses,
            "loss_falls": losses[-1] < losses[0],
            "checkpoints": sorted(p.name for p in full_dir.glob("checkpoint-*")),
            "staging_left": (full_dir / ".incomplete").exists(),
        }
        resumed_dir.mkdir()
        shutil.copytree(full_dir / "checkpoint-3", resumed_dir / "checkpoint-3")
        proc = self.launch(
            config, self.chain_keys(resumed_dir, resume_from_checkpoint=True), f"{name}-resumed", launcher
        )
        if proc.returncode != 0:
            result["resume"] = failed(f"exit {proc.returncode}: {proc.stderr[-1500:]}")
        else:
            again = logged_losses(resumed_dir / "checkpoint-6")
            difference = max(abs(a - b) for a, b in zip(again[3:], losses[3:]))
            result["resume"] = {
                "status": MEASURED,
                "losses": again,
                "max_loss_difference_steps_4_to_6": difference,
                "reproduces": len(again) == len(losses) and difference <= RESUME_TOLERANCE,
            }
        try:
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_pretrained(full_dir, dtype=torch.bfloat16)
            result["from_pretrained"] = "loads"
        except Exception as err:  # reported, not raised: the suite goes on to the next part
            result["from_pretrained"] = f"fails: {type(err).__name__}: {str(err)[:300]}"
        # A 0.5B model's checkpoint with its optimizer is ~8 GB: four per chain filled an H200 machine's 64 GiB
        # disk by the third chain. The suite made these folders (inside its own mkdtemp); their figures are read.
        for run_dir in (full_dir, resumed_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        return result

    def launched_guard_stop(self, config: Path, name: str, launcher=()) -> dict:
        """One rank's batch empty at a step known in advance: every rank must stop at it, naming that rank."""
        rows = [json.loads(line) for line in self.data.read_text().splitlines()[:40]]
        long_prompt = {
            "messages": [{"role": "user", "content": "far " * 3000}, {"role": "assistant", "content": "ok"}]
        }
        rows = rows[:5] + [long_prompt] + rows[5:]
        data = self.folder / f"{name}-guard.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        keys = self.chain_keys(
            self.folder / f"{name}-guard",
            dataset_name=str(data),
            per_device_train_batch_size=1,
            max_steps=20,
            save_strategy="no",
            packing=True,  # the cut row stays a sequence of its own with nothing to train (warn keeps it)
            packing_strategy="bfd",
            train_sampling_strategy="sequential",
        )
        dataset = guard(build_recipe(keys)).dataset  # every rank's sequences, in the order it trains them
        trainable = [sum(label != -100 for label in labels[1:]) for labels in dataset["labels"]]
        world = self.args.gpus
        step = next(
            s // world + 1 for s in range(0, len(trainable) - world + 1, world) if 0 in trainable[s : s + world]
        )
        proc = self.launch(config, keys, f"{name}-guard", launcher)
        shutil.rmtree(self.folder / f"{name}-guard", ignore_errors=True)
        stops = [line for line in proc.stdout.splitlines() if "stopped by the mask guard: step" in line]
        stopped_steps = sorted({line.split("step ", 1)[1].split(":", 1)[0] for line in stops})
        return {
            "status": MEASURED,
            "exit_code": proc.returncode,
            "expected_step": step,
            "ranks_stopped": len(stops),
            "steps_stopped_at": stopped_steps,
            "every_rank_stopped_at_that_step": proc.returncode != 0
            and len(stops) == world
            and stopped_steps == [str(step)],
        }

    def fsdp2(self) -> dict:
        if not self.cuda:
            return skipped(f"{self.no_cuda}: {FSDP_ON_CPU}")
        result = {"status": MEASURED, "processes": self.args.gpus}
        for state_dict_type in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
            result[state_dict_type] = self.over_budget() or self.launched_chain(
                ACCELERATE_CONFIGS / "fsdp.yaml",
                f"fsdp-{state_dict_type.split('_')[0].lower()}",
                ("--fsdp_state_dict_type", state_dict_type),
            )
        result["guard_stop"] = self.over_budget() or self.launched_guard_stop(ACCELERATE_CONFIGS / "fsdp.yaml", "fsdp")
        return result

    def deepspeed_zero3(self) -> dict:
        if not self.cuda:
            return skipped(self.no_cuda)
        if importlib.util.find_spec("deepspeed") is None:
            return skipped("not installed: deepspeed (pip install 'sft-toolkit[deepspeed]')")
        config = ACCELERATE_CONFIGS / "deepspeed_zero3.yaml"
        result = {"status": MEASURED, "processes": self.args.gpus}
        result["chain"] = self.over_budget() or self.launched_chain(config, "zero3")
        result["guard_stop"] = self.over_budget() or self.launched_guard_stop(config, "zero3")
        return result


def counting(cls, count_from: int):
    """`cls` that counts, in the batches it trains on after optimizer step `count_from`, the real (not padding)
    tokens, the tokens including padding and the trainable ones. The sums stay on the device until read, so
    counting adds no synchronization to the timed steps."""

    class Counting(cls):
        counted = (0, 0, 0)

        def training_step(self, model, inputs, *args, **kwargs):
            if self.state.global_step >= count_from:
                mask = inputs.get("attention_mask")
                real = mask.sum() if mask is not None else (inputs["position_ids"] >= 0).sum()
                batch = (real, inputs["input_ids"].numel(), (inputs["labels"][..., 1:] != -100).sum())
                self.counted = tuple(total + value for total, value in zip(self.counted, batch))
            return super().training_step(model, inputs, *args, **kwargs)

    return Counting


RESUME_TOLERANCE = 1e-2  # bf16 losses of the same steps; a resume that loses state differs by far more


def logged_losses(checkpoint: Path) -> list[float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flash_attention(cuda: bool, no_cuda: str) -> tuple[str | None, str]:
    """The attention implementation to measure as flash varlen, or None and why not."""
    from transformers.utils import is_flash_attn_2_available

    installed = [name for name in ("flash_attn", "kernels") if importlib.util.find_spec(name)]
    found = f"installed: {', '.join(installed)}" if installed else "not installed (neither flash_attn nor kernels)"
    if not cuda:
        return None, f"{no_cuda}; {found}"
    if not installed:
        return None, found
    if is_flash_attn_2_available() or "kernels" in installed:  # kernels fetches its build from the hub
        return "flash_attention_2", found
    return None, f"{found}, but transformers finds no usable flash_attn 2 build"


def attempt(part, *args) -> dict:
    """A part's result, or what went wrong: one failing part doesn't lose the others' figures."""
    try:
        return part(*args)
    except Exception as err:
        return failed(err)


def run(args: argparse.Namespace, save=lambda results: None) -> dict:
    """Every part in turn; `save` gets the results after each one, so a run stopped early keeps what it measured."""
    folder = Path(tempfile.mkdtemp(prefix="gpu_suite-"))
    suite = Suite(args, folder)
    import accelerate
    import transformers
    import trl

    results = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if suite.cuda else f"CPU ({torch.get_num_threads()} threads)",
        "gpus": args.gpus if suite.cuda else 0,
        "command": args.command or "python benchmarks/gpu_suite.py " + shlex.join(args.argv),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "accelerate": accelerate.__version__,
        },
        "setup": {
            "model": args.model,
            "rows": args.rows,
            "batch": args.batch,
            "max_length": args.max_length,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "dtype": "bfloat16" if suite.cuda else "float32",
        },
        "disk_free_gib": shutil.disk_usage(folder).free / 2**30,
        "complete": False,  # True once every part has run (or said why not)
        "parts": list(args.parts),
        "throughput": {},
        "packing_isolation": {},
    }
    flash, flash_note = flash_attention(suite.cuda, suite.no_cuda)
    configs = [
        ("no packing", "sdpa", {"packing": False}),
        ("bfd padding-free", "sdpa", {"packing": True, "packing_strategy": "bfd"}),
        ("bfd padding-free", flash or "flash varlen", {"packing": True, "packing_strategy": "bfd"}),
    ]
    for name, attn, extra in configs if "throughput" in args.parts else ():
        label = f"{name} ({attn})"
        if attn == "flash varlen":
            results["throughput"][label] = skipped(flash_note)
            continue
        keys = suite.keys(attn_implementation=attn, **extra)
        results["throughput"][label] = suite.over_budget() or attempt(suite.throughput, keys)
        save(results)
    for attn in ("eager", "sdpa", flash or "flash varlen") if "packing_isolation" in args.parts else ():
        if attn == "flash varlen":
            results["packing_isolation"][attn] = skipped(flash_note)
        else:
            results["packing_isolation"][attn] = suite.over_budget() or attempt(suite.isolation, attn)
        save(results)
    for part in [part for part in LAUNCHED_PARTS if part in args.parts]:
        results[part] = suite.over_budget() or attempt(getattr(suite, part))
        save(results)
    results["wall_s"], results["complete"] = time.monotonic() - suite.started, True
    keep_logs(folder, args.out)
    shutil.rmtree(folder, ignore_errors=True)
    return results


def keep_logs(folder: Path, out: Path) -> None:
    """The launched runs' logs, packed into OUT/launch_logs.tar.gz: a failed part's whole story, not its last lines."""
    import tarfile

    logs = sorted(folder.glob("*.log"))
    if logs:
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / "launch_logs.tar.gz", "w:gz") as archive:
            for log in logs:
                archive.add(log, arcname=log.name)


def _status(part: dict) -> str:
    return f"{part['status']}: {part['reason']}" if part["status"] != MEASURED else MEASURED


def _number(value, digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def markdown(results: dict) -> str:
    setup = results["setup"]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines = [
        f"### GPU suite: {results['device']}, {results['date']}",
        "",
        f"Command: `{results['command']}` ({versions}; model {setup['model']} with random weights, "
        f"{setup['dtype']}, {setup['rows']} synthetic conversations, batch {setup['batch']}, max_length "
        f"{setup['max_length']}, {setup['timed_steps']} timed steps after {setup['warmup_steps']}; "
        f"whole suite {results['wall_s']:.0f} s; parts: {', '.join(results['parts'])})",
    ]
    if results["throughput"]:
        lines += [
            "",
            "| config | trainer | step s | tokens/s | trainable tokens/s | padding |",
            "|---|---|---:|---:|---:|---:|",
        ]
    for label, part in results["throughput"].items():
        if part["status"] != MEASURED:
            lines.append(f"| {label} | {_status(part)} | | | | |")
            continue
        for trainer in ("plain", "guarded"):
            r = part[trainer]
            lines.append(
                f"| {label} | {'plain TRL' if trainer == 'plain' else 'guarded'} | {r['step_s']:.4f} | "
                f"{r['tokens_per_s']:.0f} | {r['trainable_tokens_per_s']:.0f} | {r['padding']:.1%} |"
            )
        lines.append(f"| {label} | guard overhead | {part['guard_overhead']:+.2%} | | | |")
    if results["packing_isolation"]:
        lines += [
            "",
            "| attention | max logit diff, training forward | with use_cache=True | tolerance | verdict |",
            "|---|---:|---:|---:|---|",
        ]
    for attn, part in results["packing_isolation"].items():
        if part["status"] != MEASURED:
            lines.append(f"| {attn} | | | | {_status(part)} |")
        else:
            lines.append(
                f"| {attn} | {_number(part['training_forward_max_diff'])} | {_number(part['use_cache_max_diff'])} "
                f"| {part['tolerance']:g} | {part['verdict']} |"
            )
    launched = [part for part in LAUNCHED_PARTS if part in results]
    if launched:
        lines += ["", "| part | result |", "|---|---|"]
    for part in launched:
        lines.append(
            f"| {part} | {_status(results[part]) if results[part]['status'] != MEASURED else _summary(results[part])} |"
        )
    return "\n".join(lines) + "\n"


def _summary(part: dict) -> str:
    """One cell for a measured launched or QLoRA part (results.json holds every number)."""
    if "first_loss" in part:  # QLoRA
        return (
            f"{part['steps']} steps, loss {part['first_loss']:.3f} → {part['last_loss']:.3f}, "
            f"{part['seconds']:.0f} s, peak GPU memory {part['peak_gpu_memory_gib']:.1f} GiB"
        )
    cells = [f"{part['processes']} processes"]
    for name, value in part.items():
        if not isinstance(value, dict):
            continue
        if value["status"] != MEASURED:
            cells.append(f"{name}: {_status(value)}")
        elif "losses" in value:
            resume = value["resume"]
            resumed = (
                f"resume from checkpoint-3: max loss difference {resume['max_loss_difference_steps_4_to_6']:.2g} "
                f"({'reproduces' if resume['reproduces'] else 'DIFFERS'})"
                if resume["status"] == MEASURED
                else f"resume: {_status(resume)}"
            )
            cells.append(
                f"{name}: loss {value['losses'][0]:.3f} → {value['losses'][-1]:.3f} "
                f"({'falls' if value['loss_falls'] else 'DOES NOT FALL'}), {', '.join(value['checkpoints'])}"
                f"{', STAGING LEFT' if value['staging_left'] else ', no staging left'}, {resumed}, "
                f"from_pretrained {value['from_pretrained']}"
            )
        else:  # guard stop
            cells.append(
                f"{name}: exit {value['exit_code']}, {value['ranks_stopped']} of {part['processes']} ranks stopped at "
                f"step {', '.join(value['steps_stopped_at']) or '-'} (expected {value['expected_step']})"
            )
    return "; ".join(cells).replace("|", "\\|")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny quickstart model, a few steps: seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_suite", help="results.json/.md go here")
    parser.add_argument("--model", choices=("tiny", "qwen2.5-0.5b"), default="qwen2.5-0.5b")
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each trainer, alternating; fastest kept")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--gpus", type=int, default=max(torch.cuda.device_count(), 1), help="processes for FSDP2")
    parser.add_argument("--budget-s", type=float, default=360, help="parts that would start after this are skipped")
    parser.add_argument("--command", help="the command to record (gpu_suite.sh passes its own)")
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=PARTS, help="run only these parts (default: every part)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.rows, args.steps, args.warmup, args.repeats = "tiny", 64, 2, 1, 1
        args.batch, args.max_length = 2, 128
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the clock starts at the end of the last warm-up step)")
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)

    def save(results: dict) -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    results = run(args, save)
    save(results)
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    print(f"# written: {args.out / 'results.json'}, {args.out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
