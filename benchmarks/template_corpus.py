"""The template corpus: real chat templates nobody here wrote, fetched from the package registry, never stored here.

add-markers' dev set (TRL's templates) is the set it was tuned on; this corpus is the test it wasn't. Three
packages ship official and community chat templates: axolotl's `chat_templates/templates/*.jinja`, unsloth's
templates written as Python string constants in `unsloth/chat_templates.py` (plus two in its studio, which
is AGPL-3.0) and llama.cpp's `models/templates/*.jinja` (the templates of the models' own repositories,
named after them) vendored in llama-cpp-python's source distribution. Each is pinned by version and by the
sha256 of the file `pip download` fetches, downloaded with the ordinary client into `.cache/template-corpus/`
(git-ignored) and read in memory; Python sources are read with `ast`, never executed. The project's rule
holds: no template is copied into the repository.

    python benchmarks/template_corpus.py download   # fetch what is missing (what `make corpus` runs)
    python benchmarks/template_corpus.py manifest   # rewrite benchmarks/template_corpus.md

Independent of sft_toolkit: the tests and benchmarks import it, it imports nothing of the toolkit.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from enum import Enum
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "template-corpus"
MANIFEST = Path(__file__).with_suffix(".md")
STAMP = CACHE / "downloaded"  # written after a download checks out: make's target


class Layout(str, Enum):
    """How the templates sit in a downloaded file."""

    FILES = "files"  # one template per file matching the pattern
    PYTHON_CONSTANTS = "python-constants"  # module-level string constants named `*_template` holding `{%`


@dataclass(frozen=True)
class Source:
    """One pinned download and where its templates are inside it."""

    package: str
    version: str
    filename: str  # what `pip download` saves
    sha256: str
    licence: str
    pattern: str  # path inside the archive (an sdist's top folder left out), fnmatch
    layout: Layout
    prefix: str  # short name of the origin, for test ids
    sdist: bool = False  # fetched with --no-binary

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES = [
    Source(
        "axolotl",
        "0.19.0",
        "axolotl-0.19.0-py3-none-any.whl",
        "f28eb3ad3709975eec4adfe13307dd980c7e7917cc43cb03f2c6f26c007135cc",
        "Apache-2.0",
        "axolotl/utils/chat_templates/templates/*.jinja",
        Layout.FILES,
        "axolotl",
    ),
    Source(
        "unsloth",
        "2026.10.9",
        "unsloth-2026.10.9-py3-none-any.whl",
        "feb40b99bc4f8c543a36cbd0fe6e1410d6e4ac16bd4d0c731f607adce3d63bb0",
        "Apache-2.0",
        "unsloth/chat_templates.py",
        Layout.PYTHON_CONSTANTS,
        "unsloth",
    ),
    Source(
        "unsloth",
        "2026.10.9",
        "unsloth-2026.10.9-py3-none-any.whl",
        "feb40b99bc4f8c543a36cbd0fe6e1410d6e4ac16bd4d0c731f607adce3d63bb0",
        "AGPL-3.0 (unsloth studio, studio/LICENSE.AGPL-3.0)",
        "studio/backend/assets/chat_templates/*.jinja",
        Layout.FILES,
        "unsloth-studio",
    ),
    Source(
        "llama-cpp-python",
        "0.3.36",
        "llama_cpp_python-0.3.36.tar.gz",
        "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        "MIT (llama.cpp, vendor/llama.cpp/LICENSE; templates from the models' repositories)",
        "vendor/llama.cpp/models/templates/*.jinja",
        Layout.FILES,
        "llama.cpp",
        sdist=True,
    ),
]


@dataclass(frozen=True)
class CorpusTemplate:
    origin: str  # "package==version:path[:constant]"
    licence: str
    source: str
    name: str  # "prefix/stem": short and unique, for test ids and tables

    @property
    def group(self) -> str:
        return self.name.split("/")[0]


class CorpusUnavailable(Exception):
    """A pinned file is missing or not the one pinned; the message says which and how to fetch it."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _downloads() -> dict[str, Source]:
    return {source.filename: source for source in SOURCES}


def missing(folder: Path = CACHE) -> list[str]:
    """The pinned files not (correctly) in `folder`, each with why."""
    problems = []
    for filename, source in _downloads().items():
        path = folder / filename
        if not path.is_file():
            problems.append(f"{filename} is not in {folder}")
        elif (digest := _sha256(path)) != source.sha256:
            problems.append(f"{filename} has sha256 {digest}, not the pinned {source.sha256}")
    return problems


def download(folder: Path = CACHE) -> None:
    """Fetch each pinned file that is missing with `python -m pip download --no-deps`, and check its sha256.
    Raises CorpusUnavailable with pip's last lines when a download fails."""
    folder.mkdir(parents=True, exist_ok=True)
    for filename, source in _downloads().items():
        path = folder / filename
        if path.is_file() and _sha256(path) == source.sha256:
            continue
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"]
        command += [str(folder), *(["--no-binary", source.package] if source.sdist else []), source.requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
            raise CorpusUnavailable(f"`{' '.join(command)}` failed (exit {done.returncode}):\n{tail}")
        if (digest := _sha256(path)) != source.sha256:
            raise CorpusUnavailable(f"{filename} has sha256 {digest}, not the pinned {source.sha256}")


def _members(path: Path) -> dict[str, bytes]:
    """The archive's files by path (an sdist's top folder left out) that some source's pattern wants."""
    patterns = [s.pattern for s in SOURCES if s.filename == path.name]
    out = {}
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                    out[name] = archive.read(name)
    else:
        with tarfile.open(path) as archive:
            for member in archive:
                name = member.name.split("/", 1)[-1]
                if member.isfile() and any(fnmatch.fnmatchcase(name, p) for p in patterns):
                    out[name] = archive.extractfile(member).read()
    return out


def _python_constants(text: str) -> list[tuple[str, str]]:
    """(name, value) of each module-level string constant named `*_template` whose value holds `{%`."""
    found = []
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id.endswith("_template") and "{%" in node.value.value:
                    found.append((target.id, node.value.value))
    return found


@cache
def templates(folder: Path = CACHE) -> tuple[CorpusTemplate, ...]:
    """Every template of the corpus, in a fixed order (by source, then path and constant). Raises
    CorpusUnavailable when a pinned file is missing or differs."""
    if problems := missing(folder):
        raise CorpusUnavailable(
            "; ".join(problems) + " (fetch it with `make corpus` or `python benchmarks/template_corpus.py download`)"
        )
    members = {filename: _members(folder / filename) for filename in _downloads()}
    out = []
    for source in SOURCES:
        for path, data in sorted(members[source.filename].items()):
            if not fnmatch.fnmatchcase(path, source.pattern):
                continue
            text = data.decode("utf-8")
            origin = f"{source.requirement}:{path}"
            if source.layout == Layout.FILES:
                out.append(CorpusTemplate(origin, source.licence, text, f"{source.prefix}/{Path(path).stem}"))
            else:
                for constant, value in _python_constants(text):
                    name = f"{source.prefix}/{constant.removesuffix('_template')}"
                    out.append(CorpusTemplate(f"{origin}:{constant}", source.licence, value, name))
    return tuple(out)


def manifest(corpus: tuple[CorpusTemplate, ...]) -> str:
    """benchmarks/template_corpus.md: every template with its origin and licence, and each source's pin."""
    lines = [
        "# Template corpus",
        "",
        "Generated by `python benchmarks/template_corpus.py manifest` from the pins in",
        "[template_corpus.py](template_corpus.py); `tests/test_markers_corpus.py` checks that it matches.",
        "The templates are downloaded into `.cache/template-corpus/` (`make corpus`), never stored in this",
        "repository.",
        "",
        "| download | sha256 | licence | templates at |",
        "|---|---|---|---|",
    ]
    for source in SOURCES:
        where = f"`{source.pattern}`"
        if source.layout == Layout.PYTHON_CONSTANTS:
            where += " (module-level `*_template` string constants holding `{%`)"
        pin = f"`{source.requirement}` (`{source.filename}`)"
        lines.append(f"| {pin} | `{source.sha256[:16]}…` | {source.licence} | {where} |")
    lines += ["", f"{len(corpus)} templates:", "", "| name | origin | licence |", "|---|---|---|"]
    lines += [f"| {t.name} | `{t.origin}` | {t.licence.split(' (')[0]} |" for t in corpus]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["download"]:
        try:
            download()
        except CorpusUnavailable as err:
            print(f"template corpus: {err}", file=sys.stderr)
            # On CI the corpus test must run: fail here. Elsewhere (no network) the test skips, saying why.
            return 1 if os.environ.get("CI") else 0
        STAMP.write_text("".join(f"{s.filename} {s.sha256}\n" for s in SOURCES))
        print(f"template corpus: {len(templates())} templates in {CACHE}")
        return 0
    if argv == ["manifest"]:
        MANIFEST.write_text(manifest(templates()))
        print(f"wrote {MANIFEST}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
