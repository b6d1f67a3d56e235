"""A full or read-only destination (issue 20): one line naming the file and the OS error, exit code 2, no
temporary left, the previous output byte for byte as it was.

    .venv/bin/pytest tests/test_disk_faults.py -q

The faults are real: a small tmpfs filled up to a few kilobytes or megabytes (so the write starts and fails part
of the way), and a read-only bind mount (`mount --bind D D; mount -o remount,ro,bind D`). Mounting needs root
(CAP_SYS_ADMIN); where it is not permitted the mount tests skip, and only the tests of how an error is recognised
(`destination_error`, with errors constructed in the test) run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from mmret.cli import main
from mmret.errors import UsageError
from mmret.io import atomic_file, atomic_output_dir, destination_error, write_text_atomic
from tests.fit_args import DUAL_ENCODER, fit_argv

LEFTOVER_PATTERNS = (".*.tmp", ".*.partial-*", ".*.old-*")
FILLER = "filler.bin"
EVAL = ["eval", "--device", "cpu", "--num-workers", "0", "--batch-size", "64", "--model"]


# ---- mounts -------------------------------------------------------------------------------------------------
def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def _umount(path: Path) -> None:
    result = subprocess.run(["umount", str(path)], capture_output=True, text=True)
    if result.returncode != 0:  # still busy (an open file): detach it now, the kernel frees it when unused
        subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax: "64m") mounted on the existing folder `path`."""
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` (a folder) read-only in place: a bind mount of itself, remounted read-only."""
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,ro,bind", str(path))
        yield path
    finally:
        _umount(path)


@cache
def mounting_allowed() -> bool:
    """Whether this process may mount (root with CAP_SYS_ADMIN, and `mount` is installed)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(f"/tmp/mmret-mount-probe-{uuid.uuid4().hex[:8]}")
    probe.mkdir()
    try:
        with tmpfs(probe, "64k"):
            return True
    except (OSError, subprocess.CalledProcessError):
        return False
    finally:
        probe.rmdir()


needs_mounts = pytest.mark.skipif(
    not mounting_allowed(), reason="mounting a tmpfs / a read-only bind mount needs root (CAP_SYS_ADMIN)"
)


def fill(mount: Path, leave: int) -> None:
    """Take all of `mount`'s free space but `leave` bytes (rounded to its blocks) with one file."""
    stat = os.statvfs(mount)
    free = stat.f_bavail * stat.f_frsize
    fd = os.open(mount / FILLER, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, max(free - leave, stat.f_frsize))
    finally:
        os.close(fd)


# ---- what the checks look at --------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (but the filler) with its bytes."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != FILLER
    }


def leftovers(root: Path) -> list[Path]:
    return sorted(path for pattern in LEFTOVER_PATTERNS for path in root.rglob(pattern))


def the_error_line(stderr: str, command: str) -> str:
    """The one line the refusal is: the only line that reports an error, the last one (other lines are
    progress, e.g. `mmret: resuming from ...`), and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == lines[-1:], stderr
    assert errors[0].startswith(f"mmret {command}: error: "), stderr
    return errors[0]


# ---- the previous outputs, written once ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def previous(tmp_path_factory, digits_root, trained_checkpoint) -> Path:
    """A good output of each command: shards/, eval/ (results.json and its PNGs), export/, table.md, and run/
    (the run directory of `trained_checkpoint`)."""
    if not mounting_allowed():
        pytest.skip("mounting a tmpfs / a read-only bind mount needs root (CAP_SYS_ADMIN)")
    root = tmp_path_factory.mktemp("previous")
    results = root / "eval" / "results.json"
    for argv in (
        ["shards", str(digits_root / "test"), "--output", str(root / "shards"), "--image-size", "32"],
        [*EVAL, str(trained_checkpoint), "--data", str(digits_root / "test"), "--output", str(results)],
        ["export", str(trained_checkpoint), "--output", str(root / "export")],
        ["table", str(results), "--output", str(root / "table.md")],
    ):
        assert main(argv) == 0, argv
    shutil.copytree(trained_checkpoint.parent.parent, root / "run")
    return root


@dataclass(frozen=True)
class Case:
    """One command writing into `dest`: `kept` is its previous output there (copied from `previous`), `leave`
    the free bytes a full disk keeps (less than the command writes, so the write fails part of the way)."""

    kept: str
    leave: int
    argv: Callable[[Path, Path, Path, Path], list[str]]  # (dest, previous, digits_root, checkpoint) -> argv
    compared: str = ""  # the part of `kept` that must stay byte-identical ("": all of it)


def _fit_again(dest: Path, previous: Path, digits_root: Path, checkpoint: Path) -> list[str]:
    """The fixture's fit, one epoch longer: it resumes from last.ckpt and saves a new one at the epoch's end."""
    return fit_argv(
        module=DUAL_ENCODER,
        model_args={"warmup_steps": 1},
        train=digits_root / "train",
        samples_per_epoch=32,
        max_epochs=2,
        run_dir=dest / "run",
    )


CASES = {
    "shards": Case(
        kept="shards",
        leave=64 << 10,
        argv=lambda dest, prev, digits, ckpt: [
            *("shards", str(digits / "test"), "--output", str(dest / "shards")),
            *("--image-size", "24", "--workers", "0", "--overwrite"),
        ],
    ),
    "eval": Case(
        kept="eval",
        leave=64 << 10,
        argv=lambda dest, prev, digits, ckpt: [
            *(*EVAL, str(ckpt), "--data", str(digits / "test")),
            *("--output", str(dest / "eval" / "results.json")),
        ],
    ),
    "export": Case(
        kept="export",
        leave=1 << 20,
        argv=lambda dest, prev, digits, ckpt: [
            *("export", str(ckpt), "--output", str(dest / "export"), "--overwrite"),
        ],
    ),
    "table": Case(
        kept="table.md",
        leave=0,
        argv=lambda dest, prev, digits, ckpt: [
            *("table", str(prev / "eval" / "results.json")),
            *("--format", "latex", "--output", str(dest / "table.md")),
        ],
    ),
    # A rerun writes config.yaml, run_info.json and fit.lock anew: the checkpoints are what must survive.
    "fit": Case(kept="run", leave=4 << 20, argv=_fit_again, compared="checkpoints"),
}


@needs_mounts
@pytest.mark.parametrize("fault", ["full", "read-only"])
@pytest.mark.parametrize("command", list(CASES))
def test_unwritable_destination_is_one_line_and_keeps_the_previous_output(
    command, fault, tmp_path, previous, digits_root, trained_checkpoint, capfd
):
    case = CASES[command]
    dest = tmp_path / "dest"
    dest.mkdir()
    with contextlib.ExitStack() as mounts:
        if fault == "full":
            mounts.enter_context(tmpfs(dest, "64m"))
        copy = shutil.copytree if (previous / case.kept).is_dir() else shutil.copy2
        copy(previous / case.kept, dest / case.kept)
        compared = dest / case.kept / case.compared if case.compared else dest / case.kept
        before = snapshot(compared) if compared.is_dir() else {"": compared.read_bytes()}
        if fault == "full":
            fill(dest, case.leave)
        else:
            mounts.enter_context(read_only(dest))
        capfd.readouterr()

        code = main(case.argv(dest, previous, digits_root, trained_checkpoint))

        line = the_error_line(capfd.readouterr().err, command)
        assert code == 2
        reason, number = ("No space left on device", 28) if fault == "full" else ("Read-only file system", 30)
        assert reason in line and f"errno {number}" in line and str(dest) in line, line
        after = snapshot(compared) if compared.is_dir() else {"": compared.read_bytes()}
        assert after == before  # byte for byte, and no file added or lost
        assert leftovers(dest) == []
        if command == "fit":  # the run resumes from the checkpoint it had
            from mmret.training.run_dir import newest_intact_checkpoint

            path, step, unreadable = newest_intact_checkpoint(dest / "run" / "checkpoints")
            assert path == dest / "run" / "checkpoints" / "last.ckpt" and step and not unreadable


@needs_mounts
def test_fit_refuses_read_only_checkpoints_before_training(tmp_path, previous, digits_root, capfd):
    """A run directory whose checkpoints/ is read-only is refused at once, not at the first checkpoint."""
    shutil.copytree(previous / "run", tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    before = snapshot(checkpoints)
    metrics = snapshot(tmp_path / "run").get("metrics.csv")
    with read_only(checkpoints):
        capfd.readouterr()
        code = main(_fit_again(tmp_path, previous, digits_root, checkpoints / "last.ckpt"))
        line = the_error_line(capfd.readouterr().err, "fit")
    assert code == 2
    assert f"cannot write run directory {tmp_path / 'run'} ({checkpoints})" in line
    assert "Read-only file system (errno 30)" in line and "--run_dir" in line
    assert snapshot(checkpoints) == before
    assert snapshot(tmp_path / "run").get("metrics.csv") == metrics  # not a single step was trained


@needs_mounts
def test_export_into_an_empty_read_only_folder(tmp_path, trained_checkpoint, capfd):
    """An existing empty --output passes the early checks (its parent is writable) and is written in place:
    the write itself is refused (safetensors' "os error 30"), in one line, the folder left empty."""
    output = tmp_path / "export"
    output.mkdir()
    with read_only(output):
        capfd.readouterr()
        code = main(["export", str(trained_checkpoint), "--output", str(output)])
        line = the_error_line(capfd.readouterr().err, "export")
        assert code == 2
        assert f"cannot write {output}" in line and "Read-only file system (errno 30)" in line, line
        assert list(output.iterdir()) == []
    assert leftovers(tmp_path) == []


# ---- the writers themselves ---------------------------------------------------------------------------------
@needs_mounts
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_atomic_file_refuses_with_the_file_named(fault, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("old notes\n")
    with contextlib.ExitStack() as mounts:
        if fault == "full":
            mounts.enter_context(tmpfs(tmp_path, "1m"))
            target.write_text("old notes\n")
            fill(tmp_path, 16 << 10)
        else:
            mounts.enter_context(read_only(tmp_path))
        with pytest.raises(UsageError, match=r"cannot write .*notes\.txt: .* \(errno (28|30)\); ") as raised:
            write_text_atomic(target, "x" * (256 << 10))
        assert str(target) in str(raised.value)
        assert target.read_text() == "old notes\n"
        assert leftovers(tmp_path) == []


@needs_mounts
def test_output_folder_names_the_file_at_its_final_path(tmp_path):
    """A file that fails inside the hidden work folder is named where it would have been in the output."""
    with tmpfs(tmp_path, "1m"):
        fill(tmp_path, 16 << 10)
        with pytest.raises(UsageError) as raised, atomic_output_dir(tmp_path / "out") as work:
            (work / "small.txt").write_text("fits")
            with atomic_file(work / "big.bin", binary=True) as handle:
                handle.write(b"\0" * (256 << 10))
        assert str(raised.value).startswith(f"cannot write {tmp_path / 'out' / 'big.bin'}: No space left")
        assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


@needs_mounts
def test_read_only_empty_output_folder_in_place(tmp_path):
    """An existing empty output folder is written in place: read-only, it is refused with nothing changed."""
    (tmp_path / "out").mkdir()
    with read_only(tmp_path / "out"):
        with (
            pytest.raises(UsageError, match="Read-only file system"),
            atomic_output_dir(tmp_path / "out") as work,
        ):
            (work / "dataset.json").write_text("{}")
        assert list((tmp_path / "out").iterdir()) == []


@needs_mounts
def test_checkpoint_save_on_full_disk_keeps_last_ckpt(tmp_path):
    """What `mmret fit` saves with: torch.save's RuntimeError over a full disk becomes the one-line refusal."""
    import torch

    from mmret.training.checkpoint_io import AtomicCheckpointIO

    with tmpfs(tmp_path, "8m"):
        last = tmp_path / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1000)}, last)
        old = last.read_bytes()
        fill(tmp_path, 256 << 10)
        with pytest.raises(
            UsageError, match=r"last\.ckpt: No space left on device \(errno 28\); .*--run_dir"
        ):
            AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1 << 20)}, last)
        assert last.read_bytes() == old and leftovers(tmp_path) == []


# ---- recognising the error (no mounts) ----------------------------------------------------------------------
def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 - the implicit context is what torch.save leaves
    except BaseException as err:
        return err


def test_destination_error_finds_the_os_error_behind_library_errors(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")
    torch_save = _chained(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704"), full
    )
    assert destination_error(torch_save) is full
    rust = Exception("Error while serializing: I/O error: Read-only file system (os error 30)")
    assert destination_error(rust).errno == errno.EROFS
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert destination_error(quota) is quota
    # torch.save to a path: no errno at all; the destination's free space decides (plenty here)
    assert destination_error(RuntimeError("[enforce fail at inline_container.cc:672]"), tmp_path) is None
    assert destination_error(ValueError("bad value")) is None
    assert destination_error(OSError(errno.EIO, "Input/output error")) is None


def test_unreadable_input_is_not_called_an_unwritable_output(tmp_path):
    """EACCES on a file read inside a writer's block is about that input, not the destination."""
    source = tmp_path / "elsewhere" / "image.jpg"
    with pytest.raises(PermissionError), atomic_output_dir(tmp_path / "out") as work:
        (work / "a.txt").write_text("a")
        raise PermissionError(errno.EACCES, "Permission denied", str(source))
    assert not (tmp_path / "out").exists()
