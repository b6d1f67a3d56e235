"""All-or-nothing output folders: a dataset appears complete at its final path, or not at all.

    check_output_dir(path, overwrite)            # before any work: raises UsageError for a bad target
    with atomic_output_dir(path, overwrite) as work:
        ...write files into `work`...            # an exception here leaves no trace
    write_text_atomic(path, text)                # one file: the old one or the new one, never half of it

Where the work happens:
- target missing: a hidden sibling `.NAME.partial-*` that is renamed to the target at the end (so readers,
  or a second process building the same data, never see half a dataset); parent folders created for it are
  removed again on failure;
- target an empty folder: in place (files written under temporary names by the caller, renamed when whole);
  on failure its contents are removed and the empty folder stays as it was;
- target non-empty and `overwrite`: a hidden sibling, swapped in at the end; the old output is deleted only
  after the new one is in place, so a failure leaves the old output intact.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmret.errors import UsageError


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file all-or-nothing: a temporary sibling, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
        if target.exists() and any(target.iterdir()):
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
