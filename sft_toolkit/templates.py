"""Find and read chat templates: a bundled training template by name, a `.jinja` file, or a tokenizer's own.

The bundled templates live in the repository's `templates/` folder and ship in the package as
`sft_toolkit.bundled_templates`; each one is a family's inference template with `{% generation %}`
markers added, proven byte-identical to the original by the test suite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .problems import InputError


@dataclass(frozen=True)
class Template:
    """A chat template's source and where it came from (shown in every message about it)."""

    name: str
    source: str
    origin: str


def templates_dir() -> Path:
    """An installed wheel has them in the package; a source checkout (editable install) at the repo's top."""
    here = Path(__file__).resolve().parent
    installed = here / "bundled_templates"
    return installed if installed.is_dir() else here.parent / "templates"


def bundled_names() -> list[str]:
    """Names of the training templates shipped with the toolkit (file stems of templates/*.jinja)."""
    return sorted(p.stem for p in templates_dir().glob("*.jinja"))


def bundled_path(name: str) -> Path:
    return templates_dir() / f"{name}.jinja"


def load_template(spec: str) -> Template:
    """Resolve `spec` as a bundled name, a `.jinja` file, a `tokenizer_config.json`, or a tokenizer directory."""
    path = Path(spec)
    if not path.exists() and spec in bundled_names():
        path = bundled_path(spec)
        return Template(name=spec, source=_read_text(path), origin=str(path))
    if path.is_dir():
        return _from_tokenizer_dir(path)
    if path.is_file():
        if path.name.endswith(".json"):
            return _from_tokenizer_config(path)
        return Template(name=path.stem, source=_read_text(path), origin=str(path))
    known = ", ".join(bundled_names())
    raise InputError(f"{spec}: no such file or directory, and not a bundled template name (bundled: {known})")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start}): save the template as UTF-8") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None


def _from_tokenizer_dir(folder: Path) -> Template:
    """transformers 5 saves the template as chat_template.jinja; older tokenizers keep it in the config."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return Template(name=folder.name, source=_read_text(jinja), origin=str(jinja))
    config = folder / "tokenizer_config.json"
    if config.is_file():
        return _from_tokenizer_config(config, name=folder.name)
    raise InputError(
        f"{folder}: a directory without chat_template.jinja or tokenizer_config.json; "
        "pass a tokenizer directory or a .jinja file"
    )


def _from_tokenizer_config(config: Path, name: str | None = None) -> Template:
    try:
        data = json.loads(_read_text(config))
    except json.JSONDecodeError as err:
        raise InputError(f"{config}:{err.lineno}: invalid JSON ({err.msg})") from None
    template = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        raise InputError(
            f"{config}: field 'chat_template' is missing or not a string; this tokenizer has no chat template"
        )
    return Template(name=name or config.parent.name, source=template, origin=str(config))
