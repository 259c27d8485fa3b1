"""Where the toolkit writes: the one place that decides whether a path may be created, replaced or deleted.

Every output is somebody's folder first. The *names* a directory holds (`manifest.json`, `dataset/`,
`checkpoint-N`) prove nothing: a folder holding `dataset/my_raw_data.jsonl`, a hand-copied manifest, a `-o`
through a symbolic link, a recipe whose `dataset_name` is `DIR/dataset`, an `output_dir` that is the base
model's own folder all look alike by name. So the toolkit replaces or deletes only what it can prove it
wrote, and refuses everything else with an `InputError` that names the path and the way out:

- A directory the toolkit fills as a whole (`prepare -o DIR`) carries an ownership record, `OWNER_FILE`,
  written last, that lists every file it wrote with its size and content hash. DIR is replaced only when it
  is empty, or when that record verifies: no symbolic link anywhere, no file the record does not list (a
  user's file dropped inside is found), every listed file unchanged. A `manifest.json` copied by hand has
  no record; a record copied with foreign files beside it does not verify.
- A new directory is filled under a temporary sibling (`.DIR.partial-TOKEN`) and renamed into place, so an
  interrupted run never leaves a half directory under the name a later run trusts.
- An output never is, contains or lies inside an input of the same recipe (dataset, model, template,
  prepared data, the recipe file): replacing it would delete what it is made from. A mixture source's
  `data_files` glob is an input too: no output matches it (it would be read as data) or contains its folder.
- A symbolic link is never followed to replace or delete what it points to.
- `checkpoint-N` is a checkpoint only when it is a real directory whose `trainer_state.json` records
  `global_step` N (`checkpoint_step`); only those are ever overwritten, rotated or deleted (also by
  transformers' own end-of-training cleanup, which `train` keeps from deleting anything else).
- The files a training run writes at the top of its output_dir (`RUN_FILES`: TRL's model card, the final
  model and tokenizer, training_args.bin, the repaired template) are listed, as each is written, in the
  output_dir's `OWNER_FILE` record (kind "training run"); a later run replaces only those still unchanged,
  and refuses up front a user's file of such a name (or through a link), overwrite_output_dir or not. The
  final save is made under output_dir/.incomplete and moved into place, so `save_pretrained` never deletes
  in output_dir itself. Each folder a save is staged in there carries a record written when the toolkit made it
  (`STAGING_RECORD`); one without (a user's `.incomplete/final`) is refused up front, never removed.
- A single output file (`add-markers -o`, `check-data --report`, `show --html`) is written to a temporary
  file beside it and renamed over it (never half-written), never over an input or a file inside an input
  folder (a new file beside a tokenizer is fine; inside a dataset folder, read file by file, it is not), never onto
  a directory; a missing parent folder is
  created, as `prepare -o` and `output_dir` create theirs. The path the user names is theirs to replace; a
  file written beside it under a name they did not give (`--report FILE`'s Markdown twin) replaces only a
  report of the toolkit's (`check_derived_file`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from .problems import InputError

OWNER_FILE = ".sft-toolkit-owned"
OWNER = "sft-toolkit"
OWNER_FORMAT = 1
# Files up to this size are re-hashed when ownership is verified; larger ones (dataset shards) are compared
# by size and modification time, so verifying a many-gigabyte directory costs no full read.
HASHED_BYTES = 64 * 2**20
# Files the `datasets` library itself adds beside a saved dataset when it is mapped after loading.
DERIVED_FILES = ("cache-*.arrow",)
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class Input:
    """A path a command reads, named by the recipe key or option that gave it."""

    key: str
    path: Path
    # A folder every file of which is read (a dataset, a prepared dataset): a new file put inside changes it too.
    whole_folder: bool = False
    # `path` is a glob pattern (a mixture source's `data_files`, made absolute as `datasets` resolves it): every
    # file it matches is read, those there now and those written later.
    pattern: bool = False


# The keys of `recipe_inputs` that name data: a folder of them is loaded file by file (`whole_folder`).
DATA_KEYS = ("dataset_name", "datasets[", "dataset_mixture.", "prepared")


def recipe_inputs(recipe) -> list[Input]:
    """The local paths a recipe reads: its dataset (or each source of a mixture), model, template, prepared data
    and the recipe file itself."""
    mixture, handbook = getattr(recipe, "mixture", None), getattr(recipe, "handbook_mixture", None)
    candidates = [
        ("dataset_name", recipe.script.dataset_name),
        *((f"datasets[{i}].path", source.path) for i, source in enumerate(mixture.datasets if mixture else ())),
        *(
            (f"datasets[{i}].data_files", path)
            for i, source in enumerate(mixture.datasets if mixture else ())
            for path in _data_files(getattr(source, "data_files", None))
        ),
        *(
            (f"dataset_mixture.datasets[{i}].id", source.id)
            for i, source in enumerate(handbook.datasets if handbook else ())
        ),
        ("model_name_or_path", recipe.model.model_name_or_path),
        ("chat_template_path", recipe.sft.chat_template_path),
        ("prepared", recipe.toolkit.prepared),
        ("recipe file", recipe.source),
    ]
    patterns = [
        Input(f"datasets[{i}].data_files {pattern}", _absolute_pattern(pattern, source), pattern=True)
        for i, source in enumerate(mixture.datasets if mixture else ())
        for pattern in _data_files(getattr(source, "data_files", None))
        if glob.has_magic(pattern)
    ]
    return [
        replace(item, whole_folder=item.key.startswith(DATA_KEYS) and item.path.is_dir())
        for item in existing_inputs(candidates)
    ] + patterns


def _absolute_pattern(pattern: str, source) -> Path:
    """A `data_files` glob made absolute as `datasets` resolves it: against the source's folder (and `data_dir`
    in it) when `path` is a folder, else against `data_dir`, else the working directory."""
    folder = Path(source.path) if Path(source.path).is_dir() else Path()
    base = (folder / (source.data_dir or "")).expanduser()
    return Path(os.path.abspath(base / Path(pattern).expanduser()))


def _pattern_collision(out: Path, item: Input) -> str | None:
    """How `out` collides with a glob input: it matches the pattern (a file there is read as data, now or on the
    next run), or it contains the folder the pattern reads from. `fnmatch`'s `*` also crosses `/`, so this refuses
    a little more than `datasets` would read, never less."""
    pattern = str(item.path)
    if any(fnmatch.fnmatchcase(str(candidate), pattern) for candidate in (Path(os.path.abspath(out)), _real(out))):
        return f"matches the input {item.key}, so it would be read as data"
    parts = item.path.parts
    root = Path(*parts[: next(i for i, part in enumerate(parts) if glob.has_magic(part))])
    if _real(root).is_relative_to(_real(out)):
        return f"contains the folder the input {item.key} reads"
    return None


def _data_files(value) -> list[str]:
    """The paths and glob patterns a mixture source's `data_files` names: a path, a list of them, or a mapping of
    split -> either."""
    if isinstance(value, dict):
        return [path for files in value.values() for path in _data_files(files)]
    if isinstance(value, (list, tuple)):
        return [path for files in value for path in _data_files(files)]
    return [value] if isinstance(value, str) else []


def existing_inputs(candidates: Iterable[tuple[str, object]]) -> list[Input]:
    """The candidates that name an existing local path (hub ids and bundled template names are not paths)."""
    out = []
    for key, value in candidates:
        if isinstance(value, (str, os.PathLike)) and str(value) and os.path.lexists(value):
            out.append(Input(key, Path(value)))
    return out


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def overlap(out: Path, inputs: Iterable[Input]) -> str | None:
    """How `out` collides with an input (is it, contains it, lies inside it), or None."""
    mine = _real(out)
    for item in inputs:
        if item.pattern:
            if found := _pattern_collision(out, item):
                return found
            continue
        theirs = _real(item.path)
        if mine == theirs or out.exists() and item.path.exists() and os.path.samefile(out, item.path):
            return f"is the input {item.key} ({item.path})"
        if theirs.is_relative_to(mine):
            return f"contains the input {item.key} ({item.path})"
        if mine.is_relative_to(theirs):
            return f"lies inside the input {item.key} ({item.path})"
    return None


def deleted_whole(out: str | Path) -> Path | None:
    """The folder at or above `out` that training deletes whole, whatever it holds: a checkpoint-N (rotation,
    overwrite_output_dir) or a run's staging folder (an interrupted save's cleanup); None when there is none. An
    output the user names there would go with it."""
    where = Path(os.path.abspath(out))  # (as written, `..` resolved)
    for folder in (where, *where.parents):
        if checkpoint_step(folder) is not None or folder.name == STAGING:
            return folder
    return None


def check_not_deleted_whole(out: str | Path, what: str = "the output") -> None:
    """InputError when `out` is or lies inside a folder training deletes whole (`deleted_whole`)."""
    folder = deleted_whole(out)
    if folder is not None:
        raise InputError(
            f"{out}: {'is' if Path(os.path.abspath(out)) == folder else 'lies inside'} {folder}, which training "
            f"deletes whole (checkpoint rotation, overwrite_output_dir, or the cleanup of an interrupted save) with "
            f"{what} in it; give a path outside it"
        )


# ---------------------------------------------------------------------------------------------------------
# Directories the toolkit fills as a whole


def _file_record(path: Path) -> dict:
    stat = path.stat()
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if stat.st_size <= HASHED_BYTES:
        with path.open("rb") as handle:
            record["sha256"] = hashlib.file_digest(handle, "sha256").hexdigest()
    return record


def write_owner_record(folder: Path, kind: str, token: str) -> None:
    """Record every file under `folder` (written last: a folder without it is not provably the toolkit's)."""
    files = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            if path.name != OWNER_FILE or path.parent != folder:
                files[path.relative_to(folder).as_posix()] = _file_record(path)
    record = {"owner": OWNER, "format": OWNER_FORMAT, "kind": kind, "token": token, "files": files}
    staged = folder / f"{OWNER_FILE}.{token}"
    staged.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(staged, folder / OWNER_FILE)


def ownership_problem(folder: Path, kind: str) -> str | None:
    """Why `folder` is not provably a `kind` directory the toolkit wrote; None when it is."""
    marker = folder / OWNER_FILE
    if marker.is_symlink() or not marker.is_file():
        return f"no {OWNER_FILE} record in it"
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"its {OWNER_FILE} record does not read"
    if (
        not isinstance(record, dict)
        or record.get("owner") != OWNER
        or record.get("format") != OWNER_FORMAT
        or not isinstance(record.get("files"), dict)
    ):
        return f"its {OWNER_FILE} record is not one this version of sft-toolkit writes"
    if record.get("kind") != kind:
        return f"its {OWNER_FILE} record says it holds {record.get('kind')!r}, not {kind!r}"
    files = record["files"]
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if path.is_symlink():
                return f"holds a symbolic link, {relative}"
            if name in dirs or relative == OWNER_FILE:
                continue
            if relative not in files:
                if path.parent != folder and any(fnmatch.fnmatch(name, p) for p in DERIVED_FILES):
                    continue
                return f"holds {relative}, which the toolkit did not write"
            expected = files[relative]
            found = _file_record(path)
            same = found["size"] == expected.get("size") and (
                found.get("sha256") == expected.get("sha256")
                if "sha256" in found
                else found["mtime_ns"] == expected.get("mtime_ns")
            )
            if not same:
                return f"{relative} changed since the toolkit wrote it"
    return None


def check_output_dir(out: str | Path, kind: str, inputs: Iterable[Input] = ()) -> None:
    """Raise InputError unless `out` may become a `kind` directory: new, empty, or provably the toolkit's own,
    not a symbolic link, and clear of every input."""
    out = Path(out)
    way_out = "choose a new or empty directory, or move it away yourself"
    if out.is_symlink():
        raise InputError(
            f"{out}: is a symbolic link (to {os.readlink(out)}); the toolkit never replaces what a link "
            f"points to; give the real path of a new or empty directory"
        )
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is a file, not a directory; {way_out}")
    collision = overlap(out, inputs)
    if collision:
        raise InputError(
            f"{out}: {collision}: writing there would replace the input; nothing was changed; "
            "choose an output directory outside the recipe's inputs"
        )
    check_not_deleted_whole(out)
    if Path.cwd().resolve().is_relative_to(_real(out)):
        raise InputError(
            f"{out}: is or holds the current directory, which cannot be replaced; name a new folder for it to write"
        )
    if out.is_dir() and any(out.iterdir()):
        problem = ownership_problem(out, kind)
        if problem:
            raise InputError(
                f"{out}: exists and is not a {kind} directory sft-toolkit wrote ({problem}); nothing "
                f"was changed; {way_out}"
            )


def replace_dir(out: str | Path, kind: str, fill: Callable[[Path], None], inputs: Iterable[Input] = ()) -> Path:
    """Fill a fresh temporary sibling of `out` with `fill(folder)`, record it as the toolkit's, and rename it
    into place, replacing `out` only when `check_output_dir` allows it. Returns `out`.

    An exception (or Ctrl-C) inside `fill` removes the temporary folder and leaves `out` as it was; a killed
    process leaves `.NAME.partial-TOKEN` beside it, which no command reads or removes (`leftovers` names them
    for the user to remove by hand)."""
    out = Path(out)
    inputs = list(inputs)
    check_output_dir(out, kind, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(
            f"{out}: cannot create its parent folder ({err.strerror}); choose another directory"
        ) from None
    token = secrets.token_hex(8)
    staging = out.parent / f".{out.name}.partial-{token}"
    try:
        staging.mkdir()
    except OSError as err:
        raise InputError(f"{out.parent}: cannot write there ({err.strerror}); choose another directory") from None
    try:
        fill(staging)
        write_owner_record(staging, kind, token)
        check_output_dir(out, kind, inputs)  # again: the folder may have changed while we worked
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # made by this call, under a name no one else uses
        raise
    previous = out.parent / f".{out.name}.replaced-{token}" if out.is_dir() else None
    try:
        if previous is not None:
            os.rename(out, previous)
        try:
            os.rename(staging, out)
        except OSError:
            if previous is not None:
                os.rename(previous, out)  # put the old one back
            raise
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise InputError(
            f"{out}: cannot be replaced ({err.strerror or err}); it was left as it was; choose another directory"
        ) from None
    if previous is not None:
        if ownership_problem(previous, kind) is None or not any(previous.iterdir()):
            shutil.rmtree(previous)
        else:  # changed between the check and the rename: keep it, and say where
            raise InputError(
                f"{out}: changed while it was being replaced; the new {kind} directory is in place and "
                f"the old one was kept at {previous}"
            )
    return out


# ---------------------------------------------------------------------------------------------------------
# Checkpoints in a training output_dir


def checkpoint_step(path: str | Path) -> int | None:
    """N when `path` is a real directory `checkpoint-N` whose trainer_state.json records global_step N (a
    checkpoint a trainer finished writing); None for anything else: a link, a file, a torn or foreign folder."""
    path = Path(path)
    suffix = path.name[len(CHECKPOINT_PREFIX) :]
    if not path.name.startswith(CHECKPOINT_PREFIX) or not suffix.isdigit() or path.is_symlink() or not path.is_dir():
        return None
    state = path / TRAINER_STATE
    if state.is_symlink() or not state.is_file():
        return None
    try:
        step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return int(suffix) if step == int(suffix) and not isinstance(step, bool) else None


def checkpoint_entries(output_dir: str | Path) -> list[Path]:
    """Every entry named checkpoint-N in `output_dir` (directories, files, links), by N."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint only if `checkpoint_step` proves it is one (renamed aside first, so it vanishes at
    once rather than file by file); raise InputError otherwise."""
    path = Path(path)
    if checkpoint_step(path) is None:
        raise InputError(
            f"{path}: not a checkpoint the trainer wrote (a link, a file, or no {TRAINER_STATE} with "
            f"its step); it is kept; move it away or choose another output_dir"
        )
    aside = path.parent / f".{path.name}.removed-{secrets.token_hex(4)}"
    os.rename(path, aside)
    shutil.rmtree(aside)


def rotate_checkpoints(output_dir: str | Path, limit: int | None, keep: Iterable[str | Path | None] = ()) -> None:
    """Keep at most `limit` checkpoints (as transformers' `save_total_limit`), deleting the oldest (by
    modification time, then step) among those `checkpoint_step` proves; anything else is never counted or
    touched. `keep` (the newest save, the best model) is never deleted."""
    if not limit or limit <= 0:
        return
    proven = [p for p in checkpoint_entries(output_dir) if checkpoint_step(p) is not None]
    if len(proven) <= limit:
        return
    protected = {_real(Path(k)) for k in keep if k}
    order = sorted(proven, key=lambda p: (p.stat().st_mtime_ns, checkpoint_step(p)))
    excess = len(proven) - max(limit, sum(_real(p) in protected for p in proven))
    for path in order:
        if excess <= 0:
            break
        if _real(path) not in protected:
            remove_checkpoint(path)
            excess -= 1


def remove_staging(path: str | Path) -> None:
    """Remove what an interrupted save left at `path` inside the toolkit's own staging folder, once its
    `STAGING_RECORD` proves the toolkit staged it (`make_staging`); InputError otherwise, nothing removed."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    problem = staged_problem(path)
    if problem:
        raise InputError(
            f"{problem}; the toolkit removes there only what its own interrupted saves left; nothing was "
            "removed; move it away or choose another output_dir"
        )
    shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------------
# Single output files


def check_output_file(path: str | Path, inputs: Iterable[Input] = (), example: str = "out.txt") -> Path:
    """Raise InputError unless a file may be written at `path`: not a directory, not an input, a parent that
    is (or can become) a folder. Returns the path written (a link's target, as `open` would write)."""
    given = Path(path)
    if str(path) in ("", "."):
        raise InputError(f"{path!r}: not a file name; give a file path")
    if given.is_dir():
        raise InputError(f"{given}: is a directory; give a file path (e.g. {given / example})")
    target = _real(given) if given.is_symlink() else given
    for item in inputs:
        if item.pattern:
            if found := _pattern_collision(target, item):
                raise InputError(f"{given}: {found}; nothing was changed; give an output file it does not match")
            continue
        theirs = _real(item.path)
        # The same file under another name: a case variant on a case-insensitive disk (macOS, Windows), a hard link.
        same = (
            _real(target) == theirs or target.exists() and item.path.exists() and os.path.samefile(target, item.path)
        )
        if same or os.path.lexists(target) and _real(target).is_relative_to(theirs):
            part = "is" if same else "is part of"
            raise InputError(
                f"{given}: {part} the input {item.key} ({item.path}); writing there would replace it; "
                "nothing was changed; give another output file"
            )
        if item.whole_folder and _real(target).is_relative_to(theirs):
            raise InputError(
                f"{given}: lies inside the input {item.key} ({item.path}), whose every file is read as data; a "
                "file written there would become part of it; nothing was changed; give an output file outside it"
            )
    check_not_deleted_whole(given)
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{given}: {parent} is a file, not a folder; give another output path")
            break
    return target


def check_derived_file(path: str | Path, named: str | Path, written: Callable[[Path], bool]) -> None:
    """A file written beside one the user named (`check-data --report FILE` also writes FILE.md): InputError
    unless it is absent or `written(path)` shows a report the toolkit wrote (the user never named this one)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_file() or not written(path):
        raise InputError(
            f"{path}: exists and is not a report sft-toolkit wrote; {named} is written with it beside it, "
            "so nothing was changed; move it away or name another file"
        )


def write_file(path: str | Path, text: str, inputs: Iterable[Input] = ()) -> Path:
    """Write `text` to `path` whole or not at all (a temporary file renamed over it), creating missing parent
    folders; InputError naming the path when it cannot be written."""
    target = check_output_file(path, inputs)
    staged = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staged.write_text(text, encoding="utf-8")
        os.replace(staged, target)
    except OSError as err:
        with contextlib.suppress(OSError):
            staged.unlink()
        raise InputError(f"{path}: cannot write ({err.strerror or err}); give another output file") from None
    return target


# ---------------------------------------------------------------------------------------------------------
# A training run's output_dir

MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_config.json",
    "adapter_model.safetensors",
)


def _may_save(sft, start: int) -> Callable[[int], bool]:
    """Whether this run may save checkpoint-N (N past `start`, within max_steps, on a save step)."""
    strategy = str(getattr(sft.save_strategy, "value", sft.save_strategy))
    max_steps = sft.max_steps if isinstance(sft.max_steps, int) else -1
    every = sft.save_steps if strategy == "steps" and isinstance(sft.save_steps, int) and sft.save_steps >= 1 else None

    def may_save(step: int) -> bool:
        if strategy == "no" or step <= start or 0 < max_steps < step:
            return False
        return every is None or step % every == 0 or step == max_steps

    return may_save


def check_train_output(recipe, *, resume_step: Callable[[str], int | None]) -> list[Path]:
    """Refuse (InputError, before any data is read or weights load) an output_dir that this run would damage;
    return the earlier run's checkpoints to delete before training when the recipe says
    `overwrite_output_dir: true` (only ones `checkpoint_step` proves).

    Refused: output_dir a file; output_dir that is, holds or lies inside the model, or is or lies inside
    the dataset, template or prepared data; a `checkpoint-N` this run may save that is not a checkpoint
    (a link, a file, a foreign folder): always, whatever the recipe says; a file the run writes at the top
    of output_dir that no run of the toolkit recorded, or a staging folder not its own (`check_run_files`):
    always; an earlier run's checkpoints or model, unless the recipe resumes from that output_dir or sets
    overwrite_output_dir.
    `resume_step(output_dir)`: the step `resume_from_checkpoint: true` would resume from (None: step 0)."""
    sft, toolkit = recipe.sft, recipe.toolkit
    if not sft.output_dir:
        return []
    out = Path(sft.output_dir)
    where = f"{recipe.source}: output_dir: {out}"
    if os.path.lexists(out) and not out.is_dir():
        raise InputError(
            f"{where}: is a file{' (or a broken link)' if out.is_symlink() else ''}, not a directory; "
            "choose another output_dir"
        )
    parent = next((parent for parent in out.parents if os.path.lexists(parent)), None)
    if parent is not None and not parent.is_dir():
        raise InputError(f"{where}: {parent} is a file, not a folder; choose another output_dir")
    for item in recipe_inputs(recipe):
        if item.key == "recipe file":
            continue
        collision = overlap(out, [item])
        if collision and (item.key == "model_name_or_path" or item.pattern or not collision.startswith("contains")):
            raise InputError(
                f"{where}: {collision}: training would write its checkpoints and weights there; "
                "nothing was changed; choose another output_dir"
            )
    resume = sft.resume_from_checkpoint
    resumes_here = False
    start = 0
    if resume == "true":
        resumes_here, start = True, resume_step(str(out)) or 0
    elif resume:
        resumes_here = out.is_dir() and _real(Path(resume)).parent == _real(out)
        start = checkpoint_step(resume) or 0
    may_save = _may_save(sft, start)
    entries = checkpoint_entries(out)
    for entry in entries:
        step = int(entry.name[len(CHECKPOINT_PREFIX) :])
        if may_save(step) and checkpoint_step(entry) is None:
            kind = (
                "a symbolic link"
                if entry.is_symlink()
                else "a file"
                if not entry.is_dir()
                else f"a folder without a {TRAINER_STATE} recording step {step}"
            )
            raise InputError(
                f"{where}: this run may save {entry.name}, and {entry} is {kind}, not a checkpoint the "
                "trainer wrote; nothing was changed; move it away or choose another output_dir"
            )
    proven = [] if resumes_here else [entry for entry in entries if checkpoint_step(entry) is not None]
    models = [] if resumes_here else [name for name in MODEL_FILES if os.path.lexists(out / name)]
    if (proven or models) and not getattr(toolkit, "overwrite_output_dir", False):
        held = ", ".join([p.name for p in proven][:5] + models[:3]) + (" …" if len(proven) > 5 else "")
        # Resuming is offered only where there is a checkpoint to resume from: without one, `true` starts at step 0
        # and replaces the earlier run's model, which is what overwrite_output_dir says plainly.
        resume_it = "resume it (resume_from_checkpoint: true), " if proven else ""
        raise InputError(
            f"{where}: holds an earlier run ({held}) that this run would overwrite or mix with; "
            f"nothing was changed; {resume_it}set "
            "overwrite_output_dir: true (deletes only its checkpoints, those whose trainer_state.json "
            f"shows they are, and replaces only the files its {OWNER_FILE} record lists), or choose another "
            "output_dir"
        )
    check_run_files(out, f"{recipe.source}: output_dir")
    return proven


# ---------------------------------------------------------------------------------------------------------
# Files a training run writes at the top of its output_dir

RUN_KIND = "training run"
# Checkpoints and the final save are written under output_dir/STAGING first, then renamed into place.
STAGING = ".incomplete"
FINAL_SAVE = "final"  # output_dir/STAGING/FINAL_SAVE: the end-of-training save_model, before it is placed
# In each folder the toolkit stages a save in, written when it makes the folder (before any save writes there), so
# what a killed save leaves is provably its own; a folder under STAGING without it is never removed or saved into.
STAGING_RECORD = ".sft-toolkit-staged"
STAGED_KIND = "staged save"
# What a run writes beside its checkpoints: TRL's model card (README.md, at every checkpoint save), the final
# save_model (model or adapter, tokenizer, training_args.bin), the mask guard's repaired template and the record
# that proves them. save_pretrained also deletes `model-0000N-of-0000M` shards it does not rewrite.
RUN_FILES = (
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "adapter_config.json",
    "adapter_model*.safetensors",
    "adapter_model*.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "*.tiktoken",
    "training_args.bin",
    "training_chat_template.jinja",
    OWNER_FILE,
)
# Weights an earlier run of this toolkit left that a new final save does not rewrite (another sharding, a full
# model after an adapter): removed, proven, so a loader never mixes them with the new ones.
STALE_WEIGHTS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*", "adapter_model*")


def run_files(output_dir: str | Path) -> list[Path]:
    """The entries at the top of `output_dir` whose names a training run writes (`RUN_FILES`), sorted."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if any(fnmatch.fnmatch(p.name, pattern) for pattern in RUN_FILES))


def run_record(output_dir: str | Path) -> dict | None:
    """The files output_dir's ownership record lists as written by a training run (None: no such record)."""
    marker = Path(output_dir) / OWNER_FILE
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    valid = (
        isinstance(record, dict)
        and record.get("owner") == OWNER
        and record.get("format") == OWNER_FORMAT
        and record.get("kind") == RUN_KIND
        and isinstance(record.get("files"), dict)
    )
    return record["files"] if valid else None


def run_file_problem(output_dir: str | Path, name: str, record: dict | None = None) -> str | None:
    """Why output_dir/`name` may not be replaced by a training run (None: absent, or recorded and unchanged).
    `record`: `run_record(output_dir)`, when already read."""
    path = Path(output_dir) / name
    if not os.path.lexists(path):
        return None
    if name == OWNER_FILE:
        return None if run_record(output_dir) is not None else f"{path} is not a record a sft-toolkit run wrote"
    if path.is_symlink():
        return f"{path} is a symbolic link (to {os.readlink(path)})"
    if not path.is_file():
        return f"{path} is a folder"
    expected = (record if record is not None else run_record(output_dir) or {}).get(name)
    if not isinstance(expected, dict):
        return f"{path} is not a file sft-toolkit wrote (no {OWNER_FILE} record lists it)"
    found = _file_record(path)
    same = found["size"] == expected.get("size") and (
        found.get("sha256") == expected.get("sha256")
        if "sha256" in found
        else found["mtime_ns"] == expected.get("mtime_ns")
    )
    return None if same else f"{path} changed since sft-toolkit wrote it"


def record_run_files(output_dir: str | Path, names: Iterable[str], removed: Iterable[str] = ()) -> None:
    """Add `names` (files the run just wrote at the top of output_dir) to its ownership record, and drop
    `removed`; the record is replaced whole (a temporary file renamed over it)."""
    folder = Path(output_dir)
    if os.path.lexists(folder / OWNER_FILE) and run_record(folder) is None:
        raise InputError(
            f"{folder / OWNER_FILE}: is not a record a sft-toolkit run wrote, and the run records its files "
            "there; nothing was replaced; move it away or choose another output_dir"
        )
    files = dict(run_record(folder) or {})
    for name in removed:
        files.pop(name, None)
    for name in names:
        files[name] = _file_record(folder / name)
    token = secrets.token_hex(8)
    record = {"owner": OWNER, "format": OWNER_FORMAT, "kind": RUN_KIND, "token": token, "files": files}
    staged = folder / f"{OWNER_FILE}.{token}"
    staged.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(staged, folder / OWNER_FILE)


def staging_problem(output_dir: str | Path) -> str | None:
    """Why output_dir/STAGING is not the toolkit's own staging folder (None: absent, or holding only what
    interrupted saves leave there: `checkpoint-N` and `final` folders, each with its `STAGING_RECORD`)."""
    staging = Path(output_dir) / STAGING
    if not os.path.lexists(staging):
        return None
    if staging.is_symlink():
        return f"{staging} is a symbolic link (to {os.readlink(staging)})"
    if not staging.is_dir():
        return f"{staging} is a file"
    for entry in staging.iterdir():
        ours = entry.name == FINAL_SAVE or (
            entry.name.startswith(CHECKPOINT_PREFIX) and entry.name[len(CHECKPOINT_PREFIX) :].isdigit()
        )
        if not ours:
            return f"{staging} holds {entry.name}, which no interrupted save of sft-toolkit leaves"
        problem = staged_problem(entry)
        if problem:
            return problem
    return None


def make_staging(path: str | Path) -> Path:
    """Make `path` (output_dir/STAGING/NAME, absent) for a save to be staged in, with its `STAGING_RECORD`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()
    record = {"owner": OWNER, "format": OWNER_FORMAT, "kind": STAGED_KIND}
    (path / STAGING_RECORD).write_text(json.dumps(record) + "\n", encoding="utf-8")
    return path


def staged_problem(path: str | Path) -> str | None:
    """Why `path` is not a folder the toolkit made to stage a save in (`make_staging`); None when it is."""
    path = Path(path)
    if path.is_symlink():
        return f"{path} is a symbolic link (to {os.readlink(path)})"
    if not path.is_dir():
        return f"{path} is a file"
    marker = path / STAGING_RECORD
    try:
        record = None if marker.is_symlink() else json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if not (
        isinstance(record, dict)
        and record.get("owner") == OWNER
        and record.get("format") == OWNER_FORMAT
        and record.get("kind") == STAGED_KIND
    ):
        return f"{path} has no record that sft-toolkit staged a save there ({STAGING_RECORD}): a folder of yours?"
    return None


def check_run_files(output_dir: str | Path, where: str) -> None:
    """InputError (before a run starts) for a file the run would write or delete at the top of output_dir that it
    cannot prove it wrote, and for a staging folder that is not the toolkit's."""
    problem = staging_problem(output_dir)
    if problem:
        raise InputError(
            f"{where}: {problem}; the toolkit stages its saves there (and deletes what it left); nothing was "
            "changed; move it away or choose another output_dir"
        )
    record = run_record(output_dir)
    for path in run_files(output_dir):
        problem = run_file_problem(output_dir, path.name, record)
        if problem:
            raise InputError(
                f"{where}: {problem}; a training run writes {path.name} there (model card, final model, "
                "tokenizer, training arguments or repaired template) and would replace it; nothing was changed; "
                "move it away or choose another output_dir"
            )


def place_final_save(staged: str | Path, output_dir: str | Path) -> list[str]:
    """Move the files of a final save made in `staged` to the top of output_dir, each replacing only a file the
    toolkit recorded (`run_file_problem`), and record them; the earlier run's recorded weights the new save does
    not rewrite are removed. A folder in the save moves only where nothing is. Returns the file names placed.
    InputError (nothing moved; the save kept in `staged`) when something in the way is not provably the
    toolkit's."""
    staged, folder = Path(staged), Path(output_dir)
    if not staged.is_dir():  # nothing saved (a backend whose save_model writes no file on this rank)
        return []
    names = sorted(p.name for p in staged.iterdir() if not p.is_dir() and p.name != STAGING_RECORD)
    # A folder in the save (DeepSpeed's global_stepN when ZeRO-3 does not gather the weights) goes in only new.
    folders = sorted(p.name for p in staged.iterdir() if p.is_dir())
    record = run_record(folder)
    for name in names + folders:
        problem = (
            (f"{folder / name} exists" if os.path.lexists(folder / name) else None)
            if name in folders
            else run_file_problem(folder, name, record)
        )
        if problem:
            raise InputError(
                f"{folder}: {problem}, in the way of the final save; it was kept, and the trained model kept "
                f"whole at {staged}: move {name} away and move the files of {staged} into {folder} yourself"
            )
    stale = [
        name
        for name in (record or {})
        if name not in names
        and any(fnmatch.fnmatch(name, pattern) for pattern in STALE_WEIGHTS)
        and os.path.lexists(folder / name)
        and run_file_problem(folder, name, record) is None
    ]
    for name in names:
        os.replace(staged / name, folder / name)
    for name in folders:
        os.rename(staged / name, folder / name)  # (absent: checked above)
    for name in stale:
        (folder / name).unlink()
    with contextlib.suppress(OSError):  # leave no empty staging folders behind
        (staged / STAGING_RECORD).unlink(missing_ok=True)
        staged.rmdir()
        staged.parent.rmdir()
    record_run_files(folder, names, removed=stale)
    return names


def leftovers(out: str | Path, stages: tuple[str, ...] = ("partial", "replaced")) -> list[Path]:
    """What an interrupted write of `out` left beside it (`.NAME.STAGE-TOKEN`: `replace_dir`'s `partial` and
    `replaced`, `merge_run`'s `incomplete`): never read, never removed by the toolkit (a folder may carry such a
    name without being its)."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return []
    names = tuple(f".{out.name}.{stage}-" for stage in stages)
    return sorted(p for p in parent.iterdir() if p.name.startswith(names))
