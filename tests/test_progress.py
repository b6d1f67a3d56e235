"""Progress on stderr (`mmret.progress`): a tqdm bar on a terminal, plain periodic lines elsewhere, nothing
under `--quiet`; and the commands that report it (`mmret shards`, `mmret datasets`, `mmret eval`, `mmret mine`).

The interval between plain lines is set to 0 (`MMRET_PROGRESS_INTERVAL`), so every update prints a line.

    .venv/bin/pytest tests/test_progress.py -q                            # the helper and `mmret shards`
    .venv/bin/pytest tests/test_progress.py -q -m "slow or not slow"      # + eval and mine on a checkpoint
"""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

from mmret.cli import main
from mmret.progress import INTERVAL_ENV, Progress, format_duration, line_interval, quiet_progress
from tests.shard_fixtures import write_shards


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def every_update(monkeypatch):
    """A plain progress line on every update."""
    monkeypatch.setenv(INTERVAL_ENV, "0")


# ---- the helper ------------------------------------------------------------------------------------------------
def test_a_terminal_gets_a_tqdm_bar_that_is_erased_at_the_end():
    stream = FakeTerminal()
    with Progress("embedding toy", total=8, unit="images", stream=stream, interval=0) as progress:
        assert progress.mode == "bar"
        for _ in range(8):
            progress.update()
        drawn = stream.getvalue()
    assert "\r" in drawn and "embedding toy" in drawn and "/8" in drawn and "images/s" in drawn
    assert "\n" not in drawn  # redrawn in place: no plain lines
    assert stream.getvalue().endswith("\r")  # leave=False: the bar's line is cleared


def test_plain_lines_elsewhere_with_counts_percentages_and_a_closing_line():
    stream = io.StringIO()
    with Progress("writing toy", total=4, unit="samples", stream=stream, interval=0) as progress:
        assert progress.mode == "lines"
        for _ in range(4):
            progress.update()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split(",")[0] for line in lines[:4]] == [
        "writing toy: 1/4 samples (25%)",
        "writing toy: 2/4 samples (50%)",
        "writing toy: 3/4 samples (75%)",
        "writing toy: 4/4 samples (100%)",
    ]
    assert re.fullmatch(r"writing toy: done, 4 samples in [\d.]+ s( \(.* samples/s\))?", lines[4]), lines[4]
    assert len(lines) == 5


def test_unknown_total_shows_counts_only():
    stream = io.StringIO()
    with Progress("mining", unit="queries", stream=stream, interval=0) as progress:
        progress.update(3)
        progress.update(2)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("mining: 3 queries") and lines[1].startswith("mining: 5 queries")
    assert "/" not in lines[0].split(",")[0] and "%" not in lines[0]


def test_a_loop_shorter_than_the_interval_prints_nothing():
    stream = io.StringIO()
    with Progress("writing toy", total=100, unit="samples", stream=stream, interval=3600) as progress:
        progress.update(100)
    assert stream.getvalue() == ""


def test_a_loop_left_by_an_error_has_no_closing_line():
    stream = io.StringIO()
    with pytest.raises(RuntimeError), Progress("writing", total=3, stream=stream, interval=0) as progress:
        progress.update()
        raise RuntimeError("bad sample")
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == ["writing: 1/3 items (33%)"]


def test_quiet_and_disabled_print_nothing_on_a_terminal_or_elsewhere():
    for stream in (io.StringIO(), FakeTerminal()):
        with quiet_progress(), Progress("x", total=2, stream=stream, interval=0) as progress:
            progress.update(2)
            assert progress.mode == "off"
        with Progress("x", total=2, stream=stream, interval=0, enabled=False) as progress:
            progress.update(2)
        assert stream.getvalue() == ""


def test_quiet_ends_with_its_block_and_an_outer_quiet_stays_in_force():
    stream = io.StringIO()
    with quiet_progress(True), quiet_progress(False):  # a command without --quiet inside a quiet one
        assert Progress("x", stream=stream).mode == "off"
    with quiet_progress(False):
        assert Progress("x", stream=stream).mode == "lines"
    assert Progress("x", stream=stream).mode == "lines"


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert line_interval() == 10.0
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert line_interval() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        assert line_interval() == 10.0


def test_durations_read_naturally():
    assert [format_duration(s) for s in (0.04, 9.2, 42, 185, 7440)] == [
        "0.0 s",
        "9.2 s",
        "42 s",
        "3 min 05 s",
        "2 h 04 min",
    ]


# ---- commands ----------------------------------------------------------------------------------------------
def photo_folder(root, count: int = 5):
    root.mkdir()
    for index in range(count):
        Image.new("RGB", (20, 16), (40 * index, 10, 200)).save(root / f"{index}.png")
        (root / f"{index}.txt").write_text(f"photo {index}\n")
    return root


def test_shards_prints_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, every_update):
    src = photo_folder(tmp_path / "photos")
    argv = ["shards", str(src), "--output", str(tmp_path / "out"), "--image-size", "8", "--workers", "0"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert [line.split(",")[0] for line in lines[:5]] == [
        f"writing out: {n}/5 samples ({20 * n}%)" for n in range(1, 6)
    ]
    assert lines[5].startswith("writing out: done, 5 samples in ") and len(lines) == 6
    assert captured.out.startswith("wrote 5 samples")  # results stay on stdout, progress on stderr


def test_shards_quiet_prints_no_progress(tmp_path, capsys, every_update):
    src = photo_folder(tmp_path / "photos")
    argv = ["shards", str(src), "--output", str(tmp_path / "out"), "--image-size", "8", "--workers", "0"]
    assert main([*argv, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("wrote 5 samples")


def test_bad_input_is_refused_before_any_progress(tmp_path, capsys, every_update):
    argv = ["shards", str(tmp_path / "missing"), "--output", str(tmp_path / "out"), "--image-size", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mmret shards: error: ")
    assert main(["datasets", "digits", "--output", str(tmp_path / "d"), "--image-size", "0"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_a_loop_that_ends_in_a_refusal_has_no_closing_line(tmp_path, capsys, every_update):
    src = photo_folder(tmp_path / "photos")
    for index in range(5):
        (src / f"{index}.png").write_bytes(b"not an image")  # none usable: refused once the loop is over
    code = main(
        ["shards", str(src), "--output", str(tmp_path / "out"), "--image-size", "8", "--workers", "0"]
    )
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[0].startswith("writing out: 1/5 samples (20%)")
    assert err[-1].startswith("mmret shards: error: no usable sample")
    assert not any(": done, " in line for line in err)


def test_datasets_reports_each_split_and_quiet_silences_it(tmp_path, capsys, every_update):
    argv = ["datasets", "digits", "--output", str(tmp_path / "digits"), "--image-size", "8"]
    assert main(argv) == 0
    closing = [line for line in capsys.readouterr().err.splitlines() if ": done, " in line]
    assert [line.split(":")[0] for line in closing] == ["writing digits/train", "writing digits/val",
                                                        "writing digits/test"]  # fmt: skip
    assert main([*argv, "--overwrite", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


# ---- eval and mine on a checkpoint (the session's tiny trained dual encoder) -----------------------------
@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("progress") / "small", num_samples=12, samples_per_shard=6)


@pytest.mark.slow
def test_eval_prints_progress_lines_and_quiet_prints_none(trained_checkpoint, small_set, tmp_path, capsys,
                                                          every_update):  # fmt: skip
    argv = ["eval", "--model", str(trained_checkpoint), "--data", str(small_set), "--task", "retrieval",
            "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--output"]  # fmt: skip
    assert main([*argv, str(tmp_path / "a.json")]) == 0
    err = capsys.readouterr().err.splitlines()
    images = [line.split(",")[0] for line in err if " images" in line and "done" not in line]
    assert images == [f"embedding {small_set}: {n}/12 images ({100 * n // 12}%)" for n in (4, 8, 12)]
    assert any(line.startswith(f"embedding {small_set}: done, 12 images") for line in err)
    # 2 captions per image, all different: 24 unique captions embedded in batches of 4
    assert any(line.startswith(f"embedding {small_set}: 24/24 captions (100%)") for line in err)
    assert main([*argv, str(tmp_path / "b.json"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert first["metrics"] == second["metrics"]


@pytest.mark.slow
def test_mine_prints_progress_lines_and_quiet_prints_none(trained_checkpoint, small_set, tmp_path, capsys,
                                                          every_update):  # fmt: skip
    argv = ["mine", "--model", str(trained_checkpoint), "--data", str(small_set), "--chunk-size", "5",
            "--batch-size", "6", "--num-workers", "0", "--device", "cpu", "--output"]  # fmt: skip
    assert main([*argv, str(tmp_path / "a.jsonl")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"embedding {small_set}: 6/12 images (50%)") for line in err)
    text_to_image = [
        line.split(",")[0] for line in err if line.startswith("mining text_to_image negatives: ")
    ]
    assert text_to_image[:5] == [f"mining text_to_image negatives: {n}/24 queries ({100 * n // 24}%)"
                                 for n in (5, 10, 15, 20, 24)]  # fmt: skip
    assert any(line.startswith("mining image_to_text negatives: 12/12 queries (100%)") for line in err)
    assert main([*argv, str(tmp_path / "b.jsonl"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
