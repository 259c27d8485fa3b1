"""Small local assets for a CPU quickstart: a learnable chat data set, a tiny tokenizer, a tiny model.

Why this exists: a first training run should need no model hub, no GPU and no download, finish in a
few minutes on a laptop's CPU, and still show the thing this toolkit is about: training only on what
the assistant says, with the assistant-token accuracy visibly rising. Real chat models are far too
big for that, and random text cannot be learned, so this module makes everything from scratch and
deterministically:

* `arithmetic_conversations`: short ChatML dialogues (unit conversions, additions, subtractions)
  whose answers have one fixed format ("3 km = 3000 m.", "12 + 7 = 19."), so a tiny model can learn
  most assistant tokens by copying and formatting within a few hundred steps.
* `train_tokenizer`: a 512-token byte-level BPE trained on those conversations as the chat template
  renders them, with ``<|im_start|>``, ``<|im_end|>`` and ``<|endoftext|>`` as single special tokens.
* `build_tiny_model`: a randomly initialised two-layer Qwen2 (well under 5 MB), saved with the
  tokenizer as an ordinary transformers model directory.
* `build_quickstart_assets`: all of the above under one folder, skipping what is already there.

    >>> from sft_toolkit.assets import build_quickstart_assets
    >>> paths = build_quickstart_assets(Path("quickstart"))
    >>> paths["model"], paths["train"], paths["eval"]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .problems import InputError

__all__ = [
    "SPECIAL_TOKENS",
    "arithmetic_conversations",
    "build_quickstart_assets",
    "build_tiny_model",
    "render_conversations",
    "tiny_model_config",
    "train_tokenizer",
    "write_dataset",
]

# ChatML's special tokens, in id order (ids 0, 1, 2 of the trained tokenizer).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen2's pre-tokenizer pattern: digits are split one by one, which keeps numbers learnable for a
# tiny model (and a 512-token vocabulary has no room for multi-digit tokens anyway).
PRETOKENIZE_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

TRAIN_ROWS = 2000
EVAL_ROWS = 200
TRAIN_SEED = 0
EVAL_SEED = 1
MODEL_SEED = 0

# --------------------------------------------------------------------------------------------------
# Data

# (short unit, long unit name) -> (short unit, long unit name), factor
_UNITS: tuple[tuple[str, str, str, str, int], ...] = (
    ("km", "kilometres", "m", "metres", 1000),
    ("m", "metres", "cm", "centimetres", 100),
    ("cm", "centimetres", "mm", "millimetres", 10),
    ("kg", "kilograms", "g", "grams", 1000),
    ("g", "grams", "mg", "milligrams", 1000),
    ("L", "litres", "mL", "millilitres", 1000),
)

_CONVERT_PROMPTS = (
    "Convert {v} {a} to {b}.",
    "How many {B} are in {v} {A}?",
    "What is {v} {a} in {b}?",
    "Please convert {v} {A} into {B}.",
    "{v} {a} to {b}?",
)
_CONVERT_FOLLOWUPS = ("And {v} {a}?", "What about {v} {a}?", "Now {v} {a}.")

_ADD_PROMPTS = (
    "What is {x} + {y}?",
    "Add {x} and {y}.",
    "What is the sum of {x} and {y}?",
    "Compute {x} + {y}.",
    "{x} plus {y}?",
)
_SUB_PROMPTS = (
    "What is {x} - {y}?",
    "Subtract {y} from {x}.",
    "Compute {x} - {y}.",
    "{x} minus {y}?",
)
_ADD_FOLLOWUPS = ("Now add {y} to that.", "Add {y} to the result.", "Plus {y}?")

_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a calculator. Answer with the full equation.",
    "Answer briefly.",
    "You convert units and do sums.",
)


def _conversion(rng: random.Random, unit: tuple[str, str, str, str, int] | None = None) -> tuple[str, str, tuple]:
    """A conversion question and its answer; sometimes the reverse direction (3000 m -> 3 km)."""
    unit = unit or rng.choice(_UNITS)
    a, la, b, lb, factor = unit
    v = rng.randint(1, 50)
    if rng.random() < 0.3:  # reverse: divide
        src, lsrc, dst, ldst, value, result = b, lb, a, la, v * factor, v
    else:
        src, lsrc, dst, ldst, value, result = a, la, b, lb, v, v * factor
    question = rng.choice(_CONVERT_PROMPTS).format(v=value, a=src, b=dst, A=lsrc, B=ldst)
    return question, f"{value} {src} = {result} {dst}.", (src, lsrc, dst, ldst, value, result)


def _conversion_followup(rng: random.Random, state: tuple) -> tuple[str, str]:
    src, _lsrc, dst, _ldst, value, result = state
    forward = result >= value
    factor = result // value if forward else value // result
    v = rng.randint(1, 50)
    value2, result2 = (v, v * factor) if forward else (v * factor, v)
    question = rng.choice(_CONVERT_FOLLOWUPS).format(v=value2, a=src)
    return question, f"{value2} {src} = {result2} {dst}."


def _arithmetic(rng: random.Random) -> tuple[str, str, int]:
    """An addition (two thirds) or subtraction question, its answer, and the result."""
    x, y = rng.randint(0, 50), rng.randint(0, 50)
    if rng.random() < 2 / 3:
        question = rng.choice(_ADD_PROMPTS).format(x=x, y=y)
        return question, f"{x} + {y} = {x + y}.", x + y
    x, y = max(x, y), min(x, y)
    question = rng.choice(_SUB_PROMPTS).format(x=x, y=y)
    return question, f"{x} - {y} = {x - y}.", x - y


def _turn(rng: random.Random) -> tuple[str, str, tuple]:
    if rng.random() < 0.5:
        q, a, state = _conversion(rng)
        return q, a, ("convert", state)
    q, a, result = _arithmetic(rng)
    return q, a, ("sum", result)


def _second_turn(rng: random.Random, state: tuple) -> tuple[str, str]:
    """A follow-up that depends on the first turn (half the time), otherwise a fresh question."""
    kind, value = state
    if rng.random() < 0.5:
        if kind == "convert":
            return _conversion_followup(rng, value)
        y = rng.randint(0, 50)
        return rng.choice(_ADD_FOLLOWUPS).format(y=y), f"{value} + {y} = {value + y}."
    q, a, _ = _turn(rng)
    return q, a


def arithmetic_conversations(n: int, seed: int) -> list[dict]:
    """`n` chat rows ``{"messages": [...]}``: unit conversions and sums with one fixed answer format.

    About a third carry a system message and about a quarter have two user/assistant turns (the
    second often a follow-up: "And 5 km?", "Now add 4 to that."). The same `seed` gives the same rows.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages: list[dict] = []
        if rng.random() < 1 / 3:
            messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
        question, answer, state = _turn(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.25:
            question, answer = _second_turn(rng, state)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


DATASET_CARD = """---
configs:
- config_name: all
  default: true
  data_files:
  - split: train
    path: train.jsonl
  - split: test
    path: eval.jsonl
---
Generated arithmetic conversations (sft_toolkit.assets): train.jsonl (train) and eval.jsonl (test).
"""


def write_dataset(path: Path, n: int, seed: int) -> Path:
    """Write `arithmetic_conversations(n, seed)` as JSONL (one ``{"messages": ...}`` object per line)."""
    path = Path(path)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in arithmetic_conversations(n, seed))
    _write_atomic(path, text)
    return path


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the data set is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# Tokenizer


def _bundled_chatml() -> str | None:
    """The bundled training template `templates/chatml.jinja`, or None when it cannot be read."""
    try:
        from .templates import load_template

        return load_template("chatml").source
    except Exception:  # noqa: BLE001 - the template is optional here; the assets work without it
        return None


def render_conversations(rows: Iterable[dict], template: str | None = None) -> list[str]:
    """The conversations as text: through `template` (default: the bundled chatml) or as plain ChatML."""
    template = template if template is not None else _bundled_chatml()
    rows = list(rows)
    if template is None:
        return [
            "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in row["messages"]) for row in rows
        ]
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, _ = render_jinja_template(
        conversations=[row["messages"] for row in rows],
        chat_template=template,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )
    return texts


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE on `texts` and save it as a transformers tokenizer directory in `out_dir`.

    ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` are special tokens with ids 0, 1, 2 (eos is
    ``<|im_end|>``, pad ``<|endoftext|>``); every byte is in the vocabulary, so any NFC text round-trips.
    `vocab_size` is an upper bound: a small corpus runs out of pairs to merge before reaching it.
    The bundled chatml template is attached as the chat template when it can be read. The same
    texts give the same tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    tokenizer = Tokenizer(models.BPE())
    # NFC as in Qwen2's tokenizer: with the model's config.json beside it, AutoTokenizer loads this
    # directory as a Qwen2Tokenizer, which sets NFC; setting it here keeps both loads identical.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The special tokens are cut out of the training text so no merge ever spans one.
    pieces = [piece for text in texts for piece in _split_special(text) if piece]
    tokenizer.train_from_iterator(pieces, trainer=trainer, length=len(pieces))

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    template = _bundled_chatml()
    if template is not None:
        fast.chat_template = template
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def _split_special(text: str) -> list[str]:
    pieces = [text]
    for token in SPECIAL_TOKENS:
        pieces = [part for piece in pieces for part in piece.split(token)]
    return pieces


# --------------------------------------------------------------------------------------------------
# Model


def tiny_model_config(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
):
    """A two-layer Qwen2 config with tied embeddings: about 0.4 M parameters at vocab 512 (~1.6 MB in fp32)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def build_tiny_model(tokenizer_dir: Path, out_dir: Path, seed: int = MODEL_SEED, **config_kwargs) -> Path:
    """Randomly initialise `tiny_model_config` for the tokenizer in `tokenizer_dir`; save both to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_model_config(
        len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------------
# Everything


def build_quickstart_assets(root: Path) -> dict[str, Path]:
    """Build, under `root`, whatever of these is missing, and return their paths.

    * ``train``: ``data/train.jsonl`` (2000 rows, seed 0)
    * ``eval``: ``data/eval.jsonl`` (200 rows, seed 1)
    * ``model``: ``tiny-chat/``, the tokenizer (trained on the rendered train rows) and the tiny model
    * ``card``: ``data/README.md``, a dataset card whose ``configs:`` name both files as config ``all``
      (splits train and test), so ``data/`` loads as a hub dataset does (``dataset_config: all``)

    Each is written under a temporary name and moved into place, so an interrupted build leaves
    nothing that a later call would mistake for finished. Nothing under `root` is ever replaced: a path of
    those names that is not what this builds (a ``tiny-chat`` without its config.json and tokenizer.json, a
    folder or broken link where a file goes) is the user's, and an InputError names it before anything is built.
    """
    root = Path(root)
    paths = {
        "train": root / "data" / "train.jsonl",
        "eval": root / "data" / "eval.jsonl",
        "model": root / "tiny-chat",
        "card": root / "data" / "README.md",
    }
    for key, path in paths.items():
        built = (
            (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
            if key == "model"
            else path.is_file()
        )
        if os.path.lexists(path) and not built:
            raise InputError(
                f"{path}: exists and is not the quickstart's {key} (which is built there when missing); it was "
                f"kept; move it away, or give quickstart a recipe whose model_name_or_path lies in another folder"
            )
    if not paths["train"].is_file():
        write_dataset(paths["train"], TRAIN_ROWS, TRAIN_SEED)
    if not paths["eval"].is_file():
        write_dataset(paths["eval"], EVAL_ROWS, EVAL_SEED)
    if not paths["card"].is_file():
        _write_atomic(paths["card"], DATASET_CARD)
    model_dir = paths["model"]
    if not (model_dir / "config.json").is_file() or not (model_dir / "tokenizer.json").is_file():
        rows = [json.loads(line) for line in paths["train"].read_text(encoding="utf-8").splitlines() if line]
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tiny-chat."))
        try:
            train_tokenizer(render_conversations(rows), tmp)
            build_tiny_model(tmp, tmp, seed=MODEL_SEED)
            tmp.chmod(0o755)  # mkdtemp makes it private
            for file in tmp.iterdir():
                file.chmod(0o644)
            os.rename(tmp, model_dir)  # (absent: checked above; a folder made since makes this fail, not replace it)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return paths
