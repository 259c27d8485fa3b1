"""Load a tokenizer from a local directory, a hub id, or one of the toolkit's offline builds.

`offline:NAME` (e.g. `offline:qwen2`, `offline:llama3`, `offline:mistral_tekken`) builds a real
vocabulary from files that registry packages ship, for machines that can't reach a model hub.
"""

from __future__ import annotations

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
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"tokenizer {spec!r}: cannot load ({first}). Pass a local tokenizer directory, a hub id "
            f"reachable from this machine, or {OFFLINE_PREFIX}NAME"
        ) from None
