"""Tests of `mmret demo` (at this stage: build the built-in datasets and stream a batch of each).

.venv/bin/pytest tests/test_demo.py -q
"""

from __future__ import annotations

import pytest

from mmret.cli import main


@pytest.mark.slow
def test_demo_builds_both_datasets_and_prints_a_batch_of_each(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "out"), "--quick"]) == 0
    printed = capsys.readouterr().out
    for name in ("digits", "shapes"):
        assert (tmp_path / "out" / "data" / name / "test" / "dataset.json").is_file()
        assert f"{name}: " in printed
    assert printed.count("image     [8, 3, 64, 64] float32") == 2
    assert printed.count("text      [8, 77] int64") == 2
    assert printed.count("caption   '") == 6
    # A second run reuses the data instead of failing on a non-empty folder.
    assert main(["demo", "--output", str(tmp_path / "out"), "--quick"]) == 0
