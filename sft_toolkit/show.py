"""See the mask: every token of a rendered conversation, or of a prepared (packed) dataset, coloured by
whether the model learns from it.

Token boundaries are drawn by alternating two shades within each colour, so a mask that starts one
token early (the newline of a role header) or stops one token short (the end-of-turn) is visible at a
glance. Whitespace is made visible (`↵`, `·`) because the off-by-ones hide in it.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.text import Text

from .masks import TokenMask
from .problems import InputError

TRAINED = ("black on #8fd694", "black on #5cbf69")
UNTRAINED = ("#aaaaaa on #2b2b2b", "#cccccc on #3a3a3a")


@dataclass(frozen=True)
class TokenView:
    id: int
    text: str
    trained: bool


def token_views(tm: TokenMask) -> list[TokenView]:
    return [TokenView(i, tm.text[a:b], bool(m)) for i, (a, b), m in zip(tm.ids, tm.offsets, tm.mask)]


def char_views(text: str, spans: list[tuple[int, int]]) -> list[TokenView]:
    """Without a tokenizer: runs of characters, trained or not (ids are -1)."""
    views, pos = [], 0
    for start, end in sorted(spans):
        if start > pos:
            views.append(TokenView(-1, text[pos:start], False))
        views.append(TokenView(-1, text[start:end], True))
        pos = end
    if pos < len(text):
        views.append(TokenView(-1, text[pos:], False))
    return views


def visible(text: str) -> str:
    return text.replace(" ", "·").replace("\t", "→").replace("\n", "↵\n")


def to_rich(views: list[TokenView]) -> Text:
    out = Text()
    for n, view in enumerate(views):
        style = (TRAINED if view.trained else UNTRAINED)[n % 2]
        out.append(visible(view.text), style=style)
    return out


def to_plain(views: list[TokenView]) -> str:
    """A colourless form (for logs and snapshot tests): trained runs inside ⟦ ⟧, tokens split by │."""
    out, in_trained = [], False
    for n, view in enumerate(views):
        if view.trained != in_trained:
            out.append("⟦" if view.trained else "⟧")
            in_trained = view.trained
        elif n:
            out.append("│")
        out.append(view.text.replace("\n", "↵\n"))
    if in_trained:
        out.append("⟧")
    return "".join(out)


def to_html(views: list[TokenView], title: str, summary: str) -> str:
    """A self-contained page: no scripts, no external assets; hover a token for its id."""
    spans = []
    for n, view in enumerate(views):
        cls = ("t" if view.trained else "u") + str(n % 2)
        spans.append(f'<span class="{cls}" title="id {view.id}">{html.escape(visible(view.text))}</span>')
    return _page(title, summary, f"<pre>{''.join(spans)}</pre>")


def _page(title: str, summary: str, body: str) -> str:
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: ui-monospace, monospace; background: #1e1e1e; color: #ddd; margin: 2em; }}
pre {{ white-space: pre-wrap; line-height: 1.7; }}
.t0 {{ background: #8fd694; color: #000; }} .t1 {{ background: #5cbf69; color: #000; }}
.u0 {{ background: #2b2b2b; color: #aaa; }} .u1 {{ background: #3a3a3a; color: #ccc; }}
.legend span {{ padding: 0 .5em; }}
h2 {{ font-size: 1em; border-top: 1px solid #555; padding-top: .5em; }} .cut {{ color: #f0a050; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 0 .8em; text-align: right; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(summary)}</p>
<p class="legend"><span class="t0">trained</span> <span class="u0">not trained</span>
(alternating shades mark token boundaries)</p>
{body}
</body></html>
"""


# ------------------------------------------------------------------------------- prepared / packed datasets
#
# A prepared dataset (`sft-toolkit prepare`: DIR/manifest.json + DIR/dataset/, or any `save_to_disk` folder
# with input_ids and labels) holds what the trainer trains on, after truncation and packing. Its optional
# provenance columns say where each token came from: `src_rows` (the source row) and `src_pos` (the token's
# position in that row's tokenization); `seq_lengths` holds the packed documents' lengths. A packed dataset with
# `src_rows` but no `src_pos` was packed by bfd, which packs each row's first max_length tokens whole: every
# document starts at its row's first token, so a token's position is its offset in its document (`prepare`
# saves no `src_pos` there; it would repeat what the documents already say).


@dataclass(frozen=True)
class Document:
    """One source row's run of tokens inside a packed sequence (the same boundaries check-data counts by:
    a seq_lengths boundary or a change of source row)."""

    row: int | None
    start: int
    end: int
    trainable: int
    first_pos: int | None  # the first token's position in its source row; > 0: the context before it was cut

    @property
    def context_cut(self) -> bool:
        return bool(self.first_pos)

    def to_json(self) -> dict:
        return {
            "row": self.row,
            "start": self.start,
            "end": self.end,
            "trainable": self.trainable,
            "first_pos": self.first_pos,
            "context_cut": self.context_cut,
        }

    def describe(self, number: int) -> str:
        row = "row ?" if self.row is None else f"row {self.row}"
        cut = f" · context cut (starts at token {self.first_pos} of its row)" if self.context_cut else ""
        return f"document {number} · {row} · tokens {self.start}–{self.end - 1} · {self.trainable} trained{cut}"


@dataclass(frozen=True)
class SequenceSummary:
    index: int
    length: int
    trainable: int
    documents: list[Document]

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "length": self.length,
            "trainable": self.trainable,
            "documents": [d.to_json() for d in self.documents],
        }


@dataclass(frozen=True)
class PackedToken:
    id: int
    text: str
    trained: bool
    row: int | None
    pos: int | None
    context_cut: bool


@dataclass(frozen=True)
class Prepared:
    dataset: object  # datasets.Dataset
    manifest: dict

    @property
    def tokenizer_name(self) -> str | None:
        tokenizer = self.manifest.get("tokenizer")
        return tokenizer.get("name_or_path") if isinstance(tokenizer, dict) else None


def is_prepared(path: str) -> bool:
    """`path` is (or claims to be, with a manifest) a prepared dataset rather than conversations."""
    return (Path(path) / "manifest.json").is_file() or prepared_location(path) is not None


def prepared_location(path: str) -> Path | None:
    """The `save_to_disk` folder of a prepared dataset at `path`, or None when `path` is not one."""
    root = Path(path)
    if not root.is_dir():
        return None
    for folder in (root / "dataset", root):
        if (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file():
            if (root / "manifest.json").is_file() or _is_tokenized(folder):
                return folder
    return None


def _is_tokenized(folder: Path) -> bool:
    info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
    return {"input_ids", "labels"} <= set(info.get("features") or {})


def load_prepared(path: str) -> Prepared:
    import datasets

    folder = prepared_location(path)
    if folder is None:
        raise InputError(
            f"{path}: not a prepared dataset (expected manifest.json and dataset/, or a save_to_disk "
            "folder with input_ids and labels)"
        )
    manifest_file = Path(path) / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{manifest_file}: not valid JSON ({err})") from None
    dataset = datasets.load_from_disk(str(folder))
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    missing = {"input_ids", "labels"} - set(dataset.column_names)
    if missing:
        raise InputError(
            f"{folder}: a prepared dataset needs columns input_ids and labels; missing {', '.join(sorted(missing))}"
        )
    return Prepared(dataset, manifest if isinstance(manifest, dict) else {})


def documents(labels, src_rows=None, src_pos=None, seq_lengths=None) -> list[Document]:
    """Split one sequence into its documents and count what each trains."""
    n = len(labels)
    starts = {0} if n else set()
    if seq_lengths is not None and len(seq_lengths):
        starts |= {int(b) for b in np.cumsum(seq_lengths)[:-1] if b < n}
    rows = None if src_rows is None else np.asarray(src_rows)
    if rows is not None and n:
        starts |= {int(b) for b in np.flatnonzero(rows[1:] != rows[:-1]) + 1}
    trained = np.asarray(labels) != -100
    bounds = sorted(starts) + [n]
    whole_rows = src_pos is None and rows is not None and seq_lengths is not None  # bfd: see above
    return [
        Document(
            row=None if rows is None else int(rows[a]),
            start=a,
            end=b,
            trainable=int(trained[a:b].sum()),
            first_pos=0 if whole_rows else None if src_pos is None else int(src_pos[a]),
        )
        for a, b in zip(bounds, bounds[1:])
    ]


def summaries(dataset) -> list[SequenceSummary]:
    """Every sequence's length, trainable tokens and documents (arrow batches: no Python lists per token)."""
    columns = [c for c in ("labels", "src_rows", "src_pos", "seq_lengths") if c in dataset.column_names]
    out = []
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=1000):
        flat = {c: _values_and_offsets(table[c]) for c in columns}
        for i in range(table.num_rows):
            part = {c: values[offsets[i] : offsets[i + 1]] for c, (values, offsets) in flat.items()}
            labels = part["labels"]
            out.append(
                SequenceSummary(
                    len(out),
                    len(labels),
                    int((labels != -100).sum()),
                    documents(labels, part.get("src_rows"), part.get("src_pos"), part.get("seq_lengths")),
                )
            )
    return out


def _values_and_offsets(column) -> tuple[np.ndarray, np.ndarray]:
    array = column.combine_chunks()
    return array.values.to_numpy(zero_copy_only=False), array.offsets.to_numpy(zero_copy_only=False)


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text. A token holding part of a UTF-8 character decodes to '\\ufffd' alone, so it is
    decoded with the tokens that complete the character: the first gets the text, the others ''."""

    def decode(part):
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    texts, i = [], 0
    while i < len(ids):
        text, j = decode(ids[i : i + 1]), i + 1
        if "\ufffd" in text:
            for k in range(i + 2, min(i + 5, len(ids)) + 1):
                joined = decode(ids[i:k])
                if "\ufffd" not in joined:
                    text, j = joined, k
                    break
        texts += [text] + [""] * (j - i - 1)
        i = j
    return texts


def packed_tokens(example: dict, texts: list[str], docs: list[Document]) -> list[PackedToken]:
    rows, pos = example.get("src_rows"), example.get("src_pos")
    cut = [False] * len(texts)
    for doc in docs:
        cut[doc.start : doc.end] = [doc.context_cut] * (doc.end - doc.start)
    if pos is None and rows is not None and example.get("seq_lengths") is not None:  # bfd: offsets in documents
        pos = [i - doc.start for doc in docs for i in range(doc.start, doc.end)]
    return [
        PackedToken(
            int(t),
            text,
            label != -100,
            None if rows is None else int(rows[i]),
            None if pos is None else int(pos[i]),
            cut[i],
        )
        for i, (t, text, label) in enumerate(zip(example["input_ids"], texts, example["labels"]))
    ]


def sequence_header(summary: SequenceSummary, total: int) -> str:
    return (
        f"sequence {summary.index} of {total}: {summary.length} tokens, {summary.trainable} trained, "
        f"{len(summary.documents)} document{'s' if len(summary.documents) != 1 else ''}"
    )


def overview_lines(all_sequences: list[SequenceSummary], limit: int = 50) -> list[str]:
    """A table of sequences: tokens, trained tokens, and which rows each holds (✂: context cut)."""
    zero = [s.index for s in all_sequences if s.trainable == 0]
    lines = [
        f"{len(all_sequences)} sequences, {sum(s.length for s in all_sequences)} tokens, "
        f"{sum(s.trainable for s in all_sequences)} trained; {len(zero)} with nothing to train"
        + (f" ({', '.join(map(str, zero[:20]))}{', …' if len(zero) > 20 else ''})" if zero else ""),
        f"{'seq':>5} {'tokens':>7} {'trained':>8}  documents (row: trained tokens, ✂ context cut)",
    ]
    for s in all_sequences[:limit]:
        docs = " · ".join(
            f"row {'?' if d.row is None else d.row}{' ✂' if d.context_cut else ''}: {d.trainable}" for d in s.documents
        )
        lines.append(f"{s.index:>5} {s.length:>7} {s.trainable:>8}  {docs}")
    if len(all_sequences) > limit:
        lines.append(f"… {len(all_sequences) - limit} more (--format json lists all; --sequence N shows one)")
    return lines


def packed_plain(summary: SequenceSummary, tokens: list[PackedToken], total: int) -> str:
    """The colourless form of one packed sequence: its header, then each document's header and tokens."""
    parts = [sequence_header(summary, total)]
    for number, doc in enumerate(summary.documents, start=1):
        parts.append(f"── {doc.describe(number)} ──")
        parts.append(to_plain(tokens[doc.start : doc.end]))
    return "\n".join(parts)


def packed_rich(summary: SequenceSummary, tokens: list[PackedToken], total: int) -> Text:
    out = Text(sequence_header(summary, total) + "\n", style="bold")
    for number, doc in enumerate(summary.documents, start=1):
        out.append(f"── {doc.describe(number)} ──\n", style="bold #f0a050" if doc.context_cut else "bold")
        out.append_text(to_rich(tokens[doc.start : doc.end]))
        out.append("\n")
    return out


def packed_html(
    summary: SequenceSummary,
    tokens: list[PackedToken],
    total: int,
    title: str,
    all_sequences: list[SequenceSummary] | None = None,
) -> str:
    body = []
    for number, doc in enumerate(summary.documents, start=1):
        cls = ' class="cut"' if doc.context_cut else ""
        body.append(f"<h2{cls}>{html.escape(doc.describe(number))}</h2><pre>")
        for n, token in enumerate(tokens[doc.start : doc.end]):
            cls = ("t" if token.trained else "u") + str(n % 2)
            where = f"id {token.id} · row {token.row} · position {token.pos}" + (
                " · context cut" if token.context_cut else ""
            )
            body.append(f'<span class="{cls}" title="{where}">{html.escape(visible(token.text))}</span>')
        body.append("</pre>")
    if all_sequences:
        rows = "".join(
            f"<tr><td>{s.index}</td><td>{s.length}</td><td>{s.trainable}</td><td>{len(s.documents)}</td></tr>"
            for s in all_sequences[:500]
        )
        body.append(
            f"<h2>All sequences</h2><table><tr><th>seq</th><th>tokens</th><th>trained</th><th>documents</th>"
            f"</tr>{rows}</table>"
        )
    return _page(title, sequence_header(summary, total), "".join(body))
