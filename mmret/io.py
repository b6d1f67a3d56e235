"""The one atomic writer: every file and folder mmret writes appears whole at its final path, or not at all.

    check_output_dir(path, overwrite)            # before any work: raises UsageError for a bad target
    check_output_file(path, option="--output")   # the same for a single file (existing files are replaced)
    with atomic_output_dir(path, overwrite) as work:
        ...write files into `work`...            # an exception here leaves no trace
    write_text_atomic(path, text)                # one file: the old one or the new one, never half of it
    write_json_atomic(path, content)
    with atomic_file(path, binary=True) as handle:   # for writers that want a handle (torch.save, savefig)
        torch.save(state, handle)

Files are written to a hidden temporary sibling (`.NAME.<host>-<pid>-<random>.tmp`), flushed and fsynced, then
renamed over the target, so a reader (or a kill at any moment) sees the old file or the new one. They are created
with the user's umask, like any file `open()` makes (0644 under umask 022): exports, checkpoints and results are
meant to be read by others.

Leftovers: a writer killed with SIGKILL (or a machine that lost power) leaves its temporary behind. Each one
names its writer (host and PID), so the next writer of the same NAME removes those of writers that are dead:
same host, and `os.kill(pid, 0)` says the process is gone (`remove_dead_leftovers`). A live writer's temporary,
one written on another host (a shared file system: its PID means nothing here) and a name without a host (an
older mmret) are left alone. `atomic_file` does it for `.NAME.*.tmp`, `atomic_output_dir` for `.NAME.partial-*`
folders (and `.NAME.old-*`, an output being replaced, once NAME exists again). All match `TEMPORARY_GLOB` or
`.*.partial-*`; the fit command also clears the checkpoint folder's temporaries on start.

A destination that cannot take the write (full: ENOSPC, EDQUOT, EFBIG; read-only: EROFS; not permitted:
EACCES) is a `UsageError` naming the file and the OS error, raised once the temporary is removed and the old
target is back as it was:

    cannot write runs/x/checkpoints/last.ckpt: No space left on device (errno 28); free space and run again, or
    choose another --run_dir

Every handle `atomic_file` yields names its file on a failed write (`OSError.filename`), so the message names
the file that failed even where the error passes through other writers (a shard inside a folder being written
is named by its final path, not the hidden work folder's). `destination_error` also finds the OS error behind
libraries that wrap it: torch.save's `RuntimeError` (the `OSError` is its `__context__`; without one, the
destination's free space or read-only flag decides) and Rust writers such as safetensors ("... (os error 28)").

Folders (`atomic_output_dir`):
- target missing: a hidden sibling `.NAME.partial-<host>-<pid>-<random>` that is renamed to the target at the
  end (so readers, or a second process building the same data, never see half a dataset); parent folders
  created for it are removed again on failure;
- target an empty folder: in place (files written under temporary names by the caller, renamed when whole);
  on failure its contents are removed and the empty folder stays as it was;
- target non-empty and `overwrite`: a hidden sibling, swapped in at the end; the old output is deleted only
  after the new one is in place, so a failure leaves the old output intact.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from mmret.errors import UsageError

TEMPORARY_GLOB = ".*.tmp"
log = logging.getLogger("mmret.io")
# This machine, as it appears in the names of temporaries (no path separators; `-` separates the PID).
HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"
# What follows `.NAME.` in the name of a temporary: a file, a folder being written, an output being replaced.
_LEFTOVER = re.compile(
    r"(?:(?P<kind>partial|old)-(?P<dir_host>.+)-(?P<dir_pid>\d+)-[0-9a-f]{8})"
    r"|(?:(?P<file_host>.+)-(?P<file_pid>\d+)-[0-9a-f]{8}\.tmp)"
)


# errno -> how the user gets past it ({option}: the command's option naming the destination).
_REMEDIES = {
    errno.ENOSPC: "free space and run again, or choose another {option}",
    errno.EDQUOT: "free space within your disk quota and run again, or choose another {option}",
    errno.EFBIG: "choose another {option} on a file system that takes larger files",
    errno.EROFS: "choose another {option} on a writable file system",
    errno.EACCES: "fix its permissions or choose another {option}",
}
# A library's message carrying a Rust io::Error (safetensors, tokenizers): "... (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# torch.save's zip writer reports a failed write with a message of its own (no errno).
_TORCH_WRITE_FAILURE = ("inline_container", "PytorchStreamWriter", "iostream error")
# Below this many free bytes, a torch.save that failed without an errno ran out of space.
_NEARLY_FULL = 1 << 20


def destination_error(err: BaseException, directory: str | os.PathLike | None = None) -> OSError | None:
    """The OS error behind `err` that says a destination cannot take a write (full, read-only, not permitted),
    or None when `err` is something else.

    Follows `err`'s causes and contexts. Recognises an `OSError` with one of the errnos in `_REMEDIES`, a
    library's message ending in "(os error N)", and torch.save's "enforce fail at inline_container" without an
    errno: then `directory` (where the file was being written), read-only or with under 1 MiB free, decides.
    """
    seen: set[int] = set()
    torch_failure = False
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, UsageError):  # already a message for the user, whatever it was raised from
            return None
        if isinstance(err, OSError) and err.errno in _REMEDIES:
            return err
        if not isinstance(err, OSError):
            match = _RUST_OS_ERROR.search(str(err))
            if match and int(match[1]) in _REMEDIES:
                number = int(match[1])
                return OSError(number, os.strerror(number))
            torch_failure = torch_failure or any(mark in str(err) for mark in _TORCH_WRITE_FAILURE)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    if torch_failure and directory is not None:
        try:
            stat = os.statvfs(directory)
        except OSError:
            return None
        if stat.f_flag & os.ST_RDONLY:
            return OSError(errno.EROFS, os.strerror(errno.EROFS))
        if stat.f_bavail * stat.f_frsize < _NEARLY_FULL:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def shown_path(path: str | os.PathLike) -> Path:
    """The path a user knows for a file being written: the target of a temporary (`.NAME.<tag>.tmp` -> NAME),
    and the same place in the output folder for a file in `atomic_output_dir`'s work folder."""
    # This host's writers only (a host name may hold dots, so the tag is matched with it, not guessed).
    tag = rf"{re.escape(HOST)}-\d+-[0-9a-f]{{8}}"
    parts = list(Path(path).parts)
    for index, part in enumerate(parts):
        match = re.fullmatch(rf"\.(.+)\.(?:partial|old)-{tag}", part)
        if match:
            parts[index] = match[1]
    if parts:
        match = re.fullmatch(rf"\.(.+)\.{tag}\.tmp", parts[-1])
        if match:
            parts[-1] = match[1]
    return Path(*parts)


def cannot_write(path: str | os.PathLike, error: OSError, option: str = "--output") -> UsageError:
    """The one-line refusal for a destination that `error` (see `destination_error`) says cannot take a write:
    the file (its name as the user knows it), the OS error, and what to do."""
    return UsageError(f"cannot write {shown_path(path)}: {describe_os_error(error)}; {remedy(error, option)}")


def describe_os_error(error: OSError) -> str:
    """The OS error's text and number: "No space left on device (errno 28)"."""
    return f"{error.strerror or os.strerror(error.errno)} (errno {error.errno})"


def remedy(error: OSError, option: str = "--output") -> str:
    """What to do about a destination refused with `error` ("free space and run again, or choose another
    --output")."""
    return _REMEDIES.get(error.errno, "choose another {option}").format(option=option)


def _failed_file(error: OSError, destination: Path) -> Path | None:
    """The file an OSError is about when it is one of `destination`'s (the file or folder being written, a
    temporary of it, a file in it, a parent folder being created for it): its filename, or `destination` when
    the error names none. None for another file's error (e.g. an unreadable input next to the output)."""
    if not error.filename:
        return destination
    failed = Path(os.fsdecode(error.filename))
    shown, target = Path(os.path.abspath(shown_path(failed))), Path(os.path.abspath(shown_path(destination)))
    concerns = shown == target or target in shown.parents or shown in target.parents
    return failed if concerns else None


def _discard(path: Path) -> None:
    """Remove a temporary if it is there (on a read-only file system, unlink fails even for a missing file)."""
    # Missing; or not removable: a later writer of the same name removes it (remove_dead_leftovers).
    with contextlib.suppress(OSError):
        path.unlink()


class _NamingWriter(io.BufferedWriter):
    """A buffered file that puts its own name on the OSError of a failed write or flush (`OSError.filename`
    is None there), so that whoever handles the error knows which file it was."""

    def write(self, data) -> int:
        try:
            return super().write(data)
        except OSError as err:
            self._name_on(err)
            raise

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as err:
            self._name_on(err)
            raise

    def _name_on(self, err: OSError) -> None:
        if err.filename is None:
            err.filename = self.raw.name


def _writer_tag() -> str:
    return f"{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden, unique name beside `path` for writing it (`.NAME.<host>-<pid>-<random>.<kind>`)."""
    return path.with_name(f".{path.name}.{_writer_tag()}.{kind}")


def writer_is_dead(host: str, pid: int) -> bool:
    """True only when the process `pid` on `host` is known to be gone: `host` is this machine and
    `os.kill(pid, 0)` finds no such process. A live process (also another user's), this process, another
    host: False."""
    if host != HOST or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, someone else's
        return False
    return False


def remove_dead_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries beside `path` (`.NAME.<host>-<pid>-*.tmp`, `.NAME.partial-<host>-<pid>-*`, and
    `.NAME.old-<host>-<pid>-*` while NAME exists) whose writers are dead (`writer_is_dead`); returns them."""
    path = Path(path)
    prefix = f".{path.name}."
    removed: list[Path] = []
    try:
        entries = [entry.name for entry in os.scandir(path.parent) if entry.name.startswith(prefix)]
    except OSError:  # no parent yet, or not readable: nothing of ours there
        return removed
    for name in entries:
        match = _LEFTOVER.fullmatch(name[len(prefix) :])
        if match is None:
            continue
        host, pid = match["dir_host"] or match["file_host"], int(match["dir_pid"] or match["file_pid"])
        if match["kind"] == "old" and not path.exists():
            continue  # the writer died between its two renames: this is the only copy of the old output
        if writer_is_dead(host, pid):
            leftover = path.parent / name
            _remove(leftover)
            removed.append(leftover)
            log.info("removed %s, left by process %d on %s, which is gone", leftover, pid, host)
    return removed


@contextmanager
def atomic_file(path: str | os.PathLike, binary: bool = False, option: str = "--output") -> Iterator[IO[Any]]:
    """A handle on a temporary sibling of `path`; on success it is fsynced and renamed over `path`.

    On an exception the temporary is removed and `path` is left as it was. The file gets the umask's mode.

    Args:
        path: the file to write.
        binary: a binary handle (else UTF-8 text).
        option: the command's option naming this destination, for the message when it cannot be written.

    Raises:
        UsageError: the destination is full, read-only or not permitted (see `destination_error`).
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A work folder of atomic_output_dir is new: nothing stale there.
        if ".partial-" not in path.parent.name:
            remove_dead_leftovers(path)
        # "x": a new file with mode 0666 & ~umask (tempfile.mkstemp would make it 0600 whatever the umask).
        handle = _NamingWriter(io.FileIO(tmp, "x"))
        if not binary:
            handle = io.TextIOWrapper(handle, encoding="utf-8")
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as err:
        failure = destination_error(err, path.parent)
        failed = failure and _failed_file(failure, path)
        if failed is None:
            raise
        _discard(tmp)
        raise cannot_write(failed, failure, option) from None
    finally:
        _discard(tmp)


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file written by a library that forces its own mode (safetensors writes 0600) the mode `open()`
    would have given it: 0666 less the umask; for a folder, every file below it."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for file in path.rglob("*") if path.is_dir() else [path]:
        if file.is_file() and not file.is_symlink():
            os.chmod(file, 0o666 & ~umask)


def write_text_atomic(path: str | os.PathLike, text: str, option: str = "--output") -> Path:
    """Write a text file all-or-nothing: a temporary sibling, fsync, then rename over `path` (`option`: see
    `atomic_file`)."""
    with atomic_file(path, option=option) as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, content: Any, option: str = "--output") -> Path:
    """Write `content` as indented JSON (non-JSON values as strings), all-or-nothing."""
    return write_text_atomic(path, json.dumps(content, indent=2, default=str) + "\n", option)


def check_output_file(
    path: str | os.PathLike, option: str = "--output", expected: str = "a file to write"
) -> Path:
    """The path of a file to write, refused early when it cannot be written (an existing file is replaced)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; expected the path of {expected}")
    check_output_parent(path, option)
    return path


def check_output_parent(path: str | os.PathLike, option: str = "--output") -> None:
    """Refuse early an output (file or folder) whose nearest existing ancestor is not a writable directory
    (e.g. it lies under a regular file), so that nothing is created on the way to the failure."""
    path = Path(path)
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write {option} {path}: {existing} is not a writable directory{_why_unwritable(existing)}"
        )


def _why_unwritable(directory: Path) -> str:
    """ " (OS error, errno N)" for a directory this process cannot write into, "" for a non-directory."""
    if not directory.is_dir():
        return ""
    try:
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return ""
    number = errno.EROFS if read_only else errno.EACCES
    return f" ({os.strerror(number)}, errno {number})"


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
        raise UsageError(
            f"cannot create output {str(path)!r}: {str(existing)!r} is not a writable folder"
            f"{_why_unwritable(existing)}"
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output_dir(
    target: str | Path, overwrite: bool = False, option: str = "--output"
) -> Iterator[Path]:
    """Yield a folder to write into; it becomes `target` only when the block completes.

    Args:
        target: the final output folder.
        overwrite: replace a non-empty `target` at the end. Without it, a `target` that was created by
            someone else while we worked raises FileExistsError (and ours is discarded).
        option: the command's option naming this destination, for the message when it cannot be written.

    Raises:
        UsageError: the destination is full, read-only or not permitted (see `destination_error`), also
            while the block wrote into the folder; raised after the work folder is removed.
    """
    target = Path(target)
    try:
        with _output_dir(target, overwrite) as work:
            yield work
    except Exception as err:
        failure = destination_error(err, target.parent)
        failed = failure and _failed_file(failure, target)
        if failed is None:
            raise
        raise cannot_write(failed, failure, option) from None


@contextmanager
def _output_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """`atomic_output_dir` without the translation of write errors."""
    remove_dead_leftovers(target)
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
    work = target.with_name(f".{target.name}.partial-{_writer_tag()}")
    work.mkdir()
    try:
        yield work
        if target.is_file() or (target.is_dir() and any(target.iterdir())):
            if not overwrite:
                raise FileExistsError(f"{target} was created by someone else while this output was written")
            old = target.with_name(f".{target.name}.old-{_writer_tag()}")
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
