"""Load a tokenizer from a local directory, a hub id, or one of the toolkit's offline builds.

`offline:NAME` (e.g. `offline:qwen2`, `offline:llama3`, `offline:mistral_tekken`) builds a real
vocabulary from files that registry packages ship, for machines that can't reach a model hub.
"""

from __future__ import annotations

from pathlib import Path

from .problems import InputError

OFFLINE_PREFIX = "offline:"


def load_tokenizer(spec: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """`revision` and `trust_remote_code` as `trl sft` loads the model's tokenizer (ModelConfig.model_revision,
    SFTConfig.trust_remote_code); they apply to a hub id or a local directory, not to an offline build."""
    if spec.startswith(OFFLINE_PREFIX):
        from . import offline_tokenizers

        try:
            return offline_tokenizers.load(spec[len(OFFLINE_PREFIX) :])
        except (KeyError, ValueError, ImportError) as err:
            raise InputError(f"--tokenizer {spec}: {err}") from None
    if Path(spec).is_file():  # (transformers would take it for a hub id, and wait on the network)
        raise InputError(f"tokenizer {spec!r}: {_what_to_pass(Path(spec))}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"tokenizer {spec!r}: cannot load ({first}). {_what_to_pass(Path(spec))}") from None


# The files a local tokenizer directory holds its vocabulary in (one of them is needed besides the config).
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tekken.json", "*.tiktoken")


def _what_to_pass(path: Path) -> str:
    """What to do about a tokenizer that does not load: for a local folder or file, what it lacks."""
    if path.is_dir() and not any(any(path.glob(pattern)) for pattern in VOCABULARY_FILES):
        held = sorted(p.name for p in path.iterdir())
        return (
            f"The directory has no vocabulary file ({', '.join(VOCABULARY_FILES)}; "
            f"{'it holds only ' + ', '.join(held[:5]) if held else 'it is empty'}): copy the model's tokenizer "
            "files into it"
        )
    if path.is_file():
        return "a file, not a tokenizer: pass the tokenizer's directory (the folder holding tokenizer_config.json)"
    return f"Pass a local tokenizer directory, a hub id reachable from this machine, or {OFFLINE_PREFIX}NAME"
