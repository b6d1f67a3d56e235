"""The one atomic writer: every file and folder mmret writes appears whole at its final path, or not at all.

    check_output_dir(path, overwrite)            # before any work: raises UsageError for a bad target
    check_output_file(path, option="--output")   # the same for a single file (existing files are replaced)
    with atomic_output_dir(path, overwrite) as work:
        ...write files into `work`...            # an exception here leaves no trace
    write_text_atomic(path, text)                # one file: the old one or the new one, never half of it
    write_json_atomic(path, content)
    with atomic_file(path, binary=True) as handle:   # for writers that want a handle (torch.save, savefig)
        torch.save(state, handle)

Files are written to a hidden temporary sibling (`.NAME.<pid>-<random>.tmp`), flushed and fsynced, then renamed
over the target, so a reader (or a kill at any moment) sees the old file or the new one. They are created with
the user's umask, like any file `open()` makes (0644 under umask 022): exports, checkpoints and results are
meant to be read by others. A temporary left by a SIGKILL matches `TEMPORARY_GLOB` and is removed by the next
writer that cares (the fit command does it for the checkpoint folder).

Folders (`atomic_output_dir`):
- target missing: a hidden sibling `.NAME.partial-*` that is renamed to the target at the end (so readers,
  or a second process building the same data, never see half a dataset); parent folders created for it are
  removed again on failure;
- target an empty folder: in place (files written under temporary names by the caller, renamed when whole);
  on failure its contents are removed and the empty folder stays as it was;
- target non-empty and `overwrite`: a hidden sibling, swapped in at the end; the old output is deleted only
  after the new one is in place, so a failure leaves the old output intact.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from mmret.errors import UsageError

TEMPORARY_GLOB = ".*.tmp"


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden, unique name beside `path` for writing it (`.NAME.<pid>-<random>.<kind>`)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{kind}")


@contextmanager
def atomic_file(path: str | os.PathLike, binary: bool = False) -> Iterator[IO[Any]]:
    """A handle on a temporary sibling of `path`; on success it is fsynced and renamed over `path`.

    On an exception the temporary is removed and `path` is left as it was. The file gets the umask's mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        # "x": a new file with mode 0666 & ~umask (tempfile.mkstemp would make it 0600 whatever the umask).
        with open(tmp, "xb" if binary else "x", **({} if binary else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file written by a library that forces its own mode (safetensors writes 0600) the mode `open()`
    would have given it: 0666 less the umask; for a folder, every file below it."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for file in path.rglob("*") if path.is_dir() else [path]:
        if file.is_file() and not file.is_symlink():
            os.chmod(file, 0o666 & ~umask)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file all-or-nothing: a temporary sibling, fsync, then rename over `path`."""
    with atomic_file(path) as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, content: Any) -> Path:
    """Write `content` as indented JSON (non-JSON values as strings), all-or-nothing."""
    return write_text_atomic(path, json.dumps(content, indent=2, default=str) + "\n")


def check_output_file(
    path: str | os.PathLike, option: str = "--output", expected: str = "a file to write"
) -> Path:
    """The path of a file to write, refused early when it cannot be written (an existing file is replaced)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; expected the path of {expected}")
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {option} {path}: {existing} is not a writable directory")
    return path


def looks_like_mmret_output(path: Path) -> bool:
    """True for a shards folder (dataset.json) or a built-in dataset root (train/dataset.json, ...)."""
    return (path / "dataset.json").is_file() or any(
        (path / split / "dataset.json").is_file() for split in ("train", "val", "test")
    )


def check_output_dir(path: str | Path, overwrite: bool) -> None:
    """Refuse an output that must not be written, before anything is created.

    Raises:
        UsageError: the output exists as a file; is a non-empty folder without `overwrite`; is non-empty
            but holds no mmret dataset (so `overwrite` would delete someone's files); or cannot be created.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {str(path)!r} exists and is not a folder; expected a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UsageError(
                f"output folder {str(path)!r} is not empty; pass --overwrite to replace it "
                "or choose another --output"
            )
        if not looks_like_mmret_output(path):
            raise UsageError(
                f"output folder {str(path)!r} is not empty and holds no dataset.json, so "
                "--overwrite will not delete it; choose another --output or empty it yourself"
            )
    existing = path if path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create output {str(path)!r}: {str(existing)!r} is not a writable folder")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a folder to write into; it becomes `target` only when the block completes.

    Args:
        target: the final output folder.
        overwrite: replace a non-empty `target` at the end. Without it, a `target` that was created by
            someone else while we worked raises FileExistsError (and ours is discarded).
    """
    target = Path(target)
    if target.is_dir() and not any(target.iterdir()):
        try:
            yield target
        except BaseException:
            for child in target.iterdir():
                _remove(child)
            raise
        return

    created_parents: list[Path] = []
    parent = target.parent
    while not parent.exists():
        created_parents.append(parent)
        parent = parent.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not tempfile.mkdtemp) so the folder gets the user's umask, not 0700, once renamed.
    work = target.with_name(f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    work.mkdir()
    try:
        yield work
        if target.is_file() or (target.is_dir() and any(target.iterdir())):
            if not overwrite:
                raise FileExistsError(f"{target} was created by someone else while this output was written")
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            try:
                os.rename(work, target)
            except BaseException:
                os.rename(old, target)
                raise
            _remove(old)
        else:
            if target.exists():
                target.rmdir()  # an empty folder that appeared meanwhile
            os.rename(work, target)
    except BaseException:
        _remove(work)
        for created in created_parents:  # deepest first
            try:
                created.rmdir()
            except OSError:
                break
        raise
