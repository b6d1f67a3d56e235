"""Files written for others — checkpoints, exports, results — get the user's umask (0644 under 022), not a
private 0600 that a shared group cannot read.

    .venv/bin/pytest tests/test_file_modes.py -q
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import pytest

from mmret import models
from mmret.io import write_json_atomic, write_text_atomic
from mmret.training.checkpoint_io import AtomicCheckpointIO


@contextmanager
def umask(value: int):
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoints_exports_and_results_follow_the_umask(tmp_path, mask, expected):
    model = models.create_model("test-vit-micro")
    with umask(mask):
        AtomicCheckpointIO().save_checkpoint(
            {"state_dict": model.state_dict()}, tmp_path / "ck" / "last.ckpt"
        )
        export = models.export_open_clip(model, None, tmp_path / "export")
        write_json_atomic(tmp_path / "results.json", {"metrics": {}})
        write_text_atomic(tmp_path / "table.md", "| a |\n")
    files = [tmp_path / "ck" / "last.ckpt", tmp_path / "results.json", tmp_path / "table.md"]
    files += sorted(path for path in export.iterdir() if path.is_file())
    assert {path.name for path in files} >= {"open_clip_model.safetensors", "open_clip_config.json"}
    assert {path.name: oct(mode(path)) for path in files} == {path.name: oct(expected) for path in files}
    assert mode(export) == expected | 0o111 & ~mask  # the folder: rwx where the files have rw


def test_no_temporary_is_left_beside_what_was_written(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "x")
    AtomicCheckpointIO().save_checkpoint({"x": 1}, tmp_path / "last.ckpt")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt", "last.ckpt"]
