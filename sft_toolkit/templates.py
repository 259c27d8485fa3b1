"""Find and read chat templates: a bundled training template by name, a `.jinja` file, or a tokenizer's own.

The bundled templates live in the repository's `templates/` folder and ship in the package as
`sft_toolkit.bundled_templates`; each one is a family's inference template with `{% generation %}`
markers added, proven byte-identical to the original by the test suite.

A tokenizer may carry several named templates (`additional_chat_templates/NAME.jinja` beside
`chat_template.jinja`, or a list of `{"name", "template"}` in tokenizer_config.json). transformers renders a
row that has `tools` with the one named `tool_use` and every other row with `default`
(`PreTrainedTokenizerBase.get_chat_template`), so `load_templates` returns each of them: a check of the default
alone would pass a tokenizer whose tool rows train nothing.
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
        if _beside_template_files(path):  # transformers reads the folder's template files, not the config's
            return _from_tokenizer_dir(path.parent)
        if path.name.endswith(".json"):
            return _from_tokenizer_config(path)
        return Template(name=path.stem, source=_read_text(path), origin=str(path))
    known = ", ".join(bundled_names())
    raise InputError(f"{spec}: no such file or directory, and not a bundled template name (bundled: {known})")


def load_templates(spec: str) -> list[Template]:
    """Every template `spec` holds: one, or each named template of a tokenizer (directory or config) that has several.

    Named templates are read as transformers reads them (`PreTrainedTokenizerBase.from_pretrained`): template
    files, when a directory has any, take the place of the config's entries; `chat_template.jinja` is `default`.
    """
    path = Path(spec)
    if path.is_file() and _beside_template_files(path):
        path = path.parent
    if path.is_dir():
        files = _template_files(path)
        if files:
            return [
                Template(name=path.name if name == "default" else f"{path.name}:{name}", source=_read_text(file),
                         origin=str(file))
                for name, file in files.items()
            ]  # fmt: skip
        config = path / "tokenizer_config.json"
        if config.is_file():
            return _all_from_tokenizer_config(config, name=path.name)
    elif path.is_file() and path.name.endswith(".json"):
        return _all_from_tokenizer_config(path)
    return [load_template(spec)]


def _template_files(folder: Path) -> dict[str, Path]:
    """Template files by name: `chat_template.jinja` as default, then `additional_chat_templates/*.jinja`."""
    files = {"default": folder / "chat_template.jinja"} if (folder / "chat_template.jinja").is_file() else {}
    extra = folder / ADDITIONAL_TEMPLATES
    for file in sorted(extra.glob("*.jinja")) if extra.is_dir() else ():
        files[file.name.removesuffix(".jinja")] = file
    return files


ADDITIONAL_TEMPLATES = "additional_chat_templates"  # transformers' CHAT_TEMPLATE_DIR


def _beside_template_files(config: Path) -> bool:
    """Whether `config` is a tokenizer_config.json whose folder has template files: transformers 5 saves the
    template as chat_template.jinja beside a config without one, and reads the files in the config's place."""
    return config.name == "tokenizer_config.json" and bool(_template_files(config.parent))


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start}): save the template as UTF-8") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    if text.startswith(BYTE_ORDER_MARK):  # transformers and TRL read it as text, and jinja renders it
        raise InputError(
            f"{path}: starts with a byte-order mark (U+FEFF), which the template renders as text: extra tokens at "
            "the start of every training row; save the file as UTF-8 without a BOM"
        )
    return text


BYTE_ORDER_MARK = "\ufeff"


def _from_tokenizer_dir(folder: Path) -> Template:
    """transformers 5 saves the template as chat_template.jinja; older tokenizers keep it in the config. Template
    files, where there are any, take the config's place, as transformers reads them (`load_templates`)."""
    files = _template_files(folder)
    if "default" in files:
        return Template(name=folder.name, source=_read_text(files["default"]), origin=str(files["default"]))
    if files:
        raise InputError(
            f"{folder}: its chat templates are all named ({', '.join(map(repr, files))}, in "
            f"{ADDITIONAL_TEMPLATES}/) and none is the default chat_template.jinja, which transformers reads in "
            "place of the config's; pass the one to use as a .jinja file"
        )
    config = folder / "tokenizer_config.json"
    if config.is_file():
        return _from_tokenizer_config(config, name=folder.name)
    raise InputError(
        f"{folder}: a directory without chat_template.jinja or tokenizer_config.json; "
        "pass a tokenizer directory or a .jinja file"
    )


def _from_tokenizer_config(config: Path, name: str | None = None) -> Template:
    """The config's template; of named ones, `default` (the one transformers renders a row without tools with)."""
    templates = _all_from_tokenizer_config(config, name)
    default = [template for template in templates if template.name == (name or config.parent.name)]
    if not default:
        names = ", ".join(repr(template.name.rpartition(":")[2]) for template in templates)
        raise InputError(
            f"{config}: field 'chat_template' holds named templates ({names}) and none is named 'default'; "
            "pass the one to use as a .jinja file"
        )
    return default[0]


def _all_from_tokenizer_config(config: Path, name: str | None = None) -> list[Template]:
    try:
        data = json.loads(_read_text(config))
    except json.JSONDecodeError as err:
        raise InputError(f"{config}:{err.lineno}: invalid JSON ({err.msg})") from None
    name = name or config.parent.name
    template = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(template, str):
        return [Template(name=name, source=template, origin=str(config))]
    named = {}
    if isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in template):
        named = {t["name"]: t.get("template") for t in template}  # [{"name": "default", "template": ...}, ...]
    if not named or not all(isinstance(source, str) for source in named.values()):
        raise InputError(
            f"{config}: field 'chat_template' is missing, or neither a string nor a list of "
            '{"name": ..., "template": "..."}; this tokenizer has no chat template'
        )
    return [
        Template(
            name=name if label == "default" else f"{name}:{label}",
            source=source,
            origin=str(config) if label == "default" else f"{config} (chat template {label!r})",
        )
        for label, source in named.items()
    ]
