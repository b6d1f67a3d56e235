"""Leftovers of killed writers (issue 21): a SIGKILLed `mmret shards` leaves its `.NAME.partial-*` folder; the
next run writing the same output removes it, and only the temporaries of writers that are dead (same host, no
such process): a live concurrent writer's work is never touched.

.venv/bin/pytest tests/test_leftovers.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmret.cli import main
from mmret.io import atomic_output_dir, write_text_atomic

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """The PID of a process of ours that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def live_pid():
    """The PID of another process that is running for the whole test."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process.pid
    process.kill()
    process.wait()


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_only_partials_of_dead_writers_on_this_host_are_removed(tmp_path, live_pid):
    from mmret.io import HOST

    dead = dead_pid()
    kept = [
        f".out.partial-{HOST}-{live_pid}-0000000a",  # a concurrent writer at work
        f".out.partial-{HOST}-{os.getpid()}-0000000b",  # this process
        f".out.partial-elsewhere.example.org-{dead}-0000000c",  # another host: its PID means nothing here
        f".out.partial-{dead}-0000000d",  # an older mmret's name without a host
        f".out.old-{HOST}-{dead}-0000000e",  # killed between its renames: the only copy of the old output
        f".other.partial-{HOST}-{dead}-0000000f",  # another output's
    ]
    for name in [*kept, f".out.partial-{HOST}-{dead}-00000001"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "00000.tar").write_bytes(b"half a shard")
    with atomic_output_dir(tmp_path / "out") as work:
        (work / "dataset.json").write_text("{}")
    assert hidden(tmp_path) == sorted(kept)
    # now that `out` exists again, the dead writer's `.old` copy is garbage; a second dead partial goes too
    (tmp_path / f".out.partial-{HOST}-{dead}-00000002").mkdir()
    with atomic_output_dir(tmp_path / "out", overwrite=True) as work:
        (work / "dataset.json").write_text("{}")
    assert hidden(tmp_path) == sorted(set(kept) - {f".out.old-{HOST}-{dead}-0000000e"})


def test_only_temporary_files_of_dead_writers_are_removed(tmp_path, live_pid):
    from mmret.io import HOST

    dead = dead_pid()
    live = f".results.json.{HOST}-{live_pid}-0000000a.tmp"
    (tmp_path / live).write_text("being written")
    (tmp_path / f".results.json.{HOST}-{dead}-00000001.tmp").write_text("half")
    write_text_atomic(tmp_path / "results.json", "{}")
    assert hidden(tmp_path) == [live]


@pytest.mark.slow
def test_a_killed_shards_run_leaves_a_partial_that_the_next_run_removes(tmp_path):
    rng = np.random.default_rng(0)
    image = tmp_path / "image.png"
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(image)
    images = tmp_path / "images"  # 3000 names of one noise picture: several seconds of decoding and resizing
    images.mkdir()
    for i in range(3000):
        (images / f"{i:04d}.png").symlink_to(image)
    table = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps({"image": str(images / f"{i:04d}.png"), "caption": f"noise {i}"}) for i in range(3000)
    ]
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = [
        "shards",
        str(table),
        "--output",
        str(out),
        "--image-size",
        "32",
        "--shard-size",
        "100",
        "--workers",
        "1",
    ]
    process = subprocess.Popen([sys.executable, "-m", "mmret", *args], cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    partials: list[Path] = []
    while not partials and process.poll() is None and time.monotonic() < deadline:
        partials = list(tmp_path.glob(".out.partial-*"))
        time.sleep(0.005)
    assert partials, f"no partial output appeared: {process.communicate()[1].decode()[-2000:]}"
    process.send_signal(signal.SIGKILL)  # mid-write: the folder is there, the conversion is not finished
    process.wait()
    assert process.returncode == -signal.SIGKILL and not out.exists()
    assert [p.name for p in tmp_path.glob(".out.partial-*")] == [partials[0].name]
    assert f"-{process.pid}-" in partials[0].name  # the writer is named (host and PID)

    assert main(args) == 0
    assert json.loads((out / "dataset.json").read_text())["num_samples"] == 3000
    assert hidden(tmp_path) == []  # the killed run's partial folder is gone, nothing new is left
