"""The README's 5-minute tour, run line by line exactly as written, from a fresh working folder.

.venv/bin/pytest tests/test_readme_tour.py -q

Every ```bash block of the "A 5-minute tour" section is run top to bottom in a temporary folder that holds the
repository's experiments/ and slurm/ (links), as a user would run them from the repository root with the
environment active: `mmret ...` through the console script's `main` in this process, `python ...` as a
subprocess on this interpreter's PATH, `sbatch ...` against a real local SLURM cluster (tests/slurm_cluster.py),
after which the job must complete; a line ending in `&` (`mmret serve`) starts the console script as a
background process, stopped at the end, and `curl` runs as a subprocess against it. "Bring your own data" has
its own test, tests/test_byod.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tests.slurm_cluster as slurm
from mmret.cli import main
from mmret.training.run_dir import RUN_DIR_ENV

REPO = Path(__file__).resolve().parents[1]
SECTION = "## A 5-minute tour"


def section_commands(readme: str, heading: str) -> list[str]:
    """The commands of the ```bash blocks under `heading` (to the next `## `): comments dropped, `\\`
    continuations joined."""
    start = readme.index(heading)
    end = readme.find("\n## ", start + len(heading))
    section = readme[start : end if end != -1 else len(readme)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [
            line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")
        ]
    return commands


COMMANDS = section_commands((REPO / "README.md").read_text(), SECTION)


def test_tour_covers_the_demo_steps_and_the_scale_out_commands():
    programs = [shlex.split(command)[:2] for command in COMMANDS]
    for expected in (
        ["mmret", "datasets"],
        ["mmret", "fit"],
        ["mmret", "eval"],
        ["mmret", "mine"],
        ["mmret", "table"],
        ["mmret", "sweep"],
        ["mmret", "index"],
        ["mmret", "search"],
        ["mmret", "serve"],
        ["curl", "-s"],
    ):
        assert expected in programs, f"the tour has no `{' '.join(expected)}`"
    assert any(command.startswith("sbatch slurm/train.sbatch ") for command in COMMANDS)
    assert any("--reranker" in command for command in COMMANDS)
    assert {words[0] for words in programs} <= {
        "mmret",
        "python",
        "sbatch",
        "curl",
    }  # each has a runner below
    assert all(not command.endswith("&") or command.startswith("mmret serve ") for command in COMMANDS)


@pytest.fixture(scope="module")
def tour_cluster(tmp_path_factory):
    """A local SLURM cluster for this module only, on ports of its own (tests/test_slurm.py's session cluster
    may be running at the same time)."""
    original = slurm._slurm_conf

    def conf_with_own_ports(*args) -> str:
        return original(*args).replace("Port=16817", "Port=16917").replace("Port=16818", "Port=16918")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(slurm, "_slurm_conf", conf_with_own_ports)
        cluster = slurm.slurm_cluster.__wrapped__(tmp_path_factory)  # the fixture's generator, driven here
        running = next(cluster)
    yield running
    cluster.close()  # its `finally`: cancels jobs, stops the daemons by pid


@pytest.fixture
def one_compute_thread():
    """Commands run in this process: one intra-op thread, as `mmret demo` uses on two cores and the SLURM job
    gets from OMP_NUM_THREADS (on shared cores, two threads ran these steps ~3x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
@pytest.mark.slurm
def test_every_tour_command_runs_as_written(tmp_path, tour_cluster, monkeypatch, one_compute_thread):
    workdir = tmp_path / "clone"
    workdir.mkdir()
    for name in ("experiments", "slurm"):
        (workdir / name).symlink_to(REPO / name)
    monkeypatch.chdir(workdir)
    # The environment is active: its bin/ (mmret, python) comes first on PATH, also inside the SLURM job.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv(RUN_DIR_ENV, "")  # recorded, so the teardown restores whatever was there before

    seconds = {}
    background: list[subprocess.Popen] = []  # `mmret serve ... &`: a service the next commands talk to
    try:
        for command in COMMANDS:
            started = time.monotonic()
            run_tour_command(command, workdir, path, tour_cluster, background)
            seconds[command] = time.monotonic() - started
    finally:
        for process in background:
            process.terminate()
            process.wait(timeout=30)
    print("\n".join(f"{value:6.1f} s  {command}" for command, value in seconds.items()))  # shown with -s

    for name in ("digits", "shapes"):
        assert (workdir / "data" / name / "test" / "dataset.json").is_file()
    for run in ("digits", "shapes", "reranker"):
        assert (workdir / "runs" / "tour" / run / "results.json").is_file()
    assert (workdir / "runs" / "tour" / "exported" / "open_clip_config.json").is_file()
    assert (workdir / "runs" / "tour" / "search.png").is_file()


def run_tour_command(command: str, workdir: Path, path: str, tour_cluster, background: list) -> None:
    """One tour line as a shell would run it (see the module docstring)."""
    words = shlex.split(command)
    os.environ.pop(RUN_DIR_ENV, None)  # each command starts afresh, as in a shell (`fit` exports its run dir)
    if words[-1] == "&":  # a service left running: the console script in a process of its own
        background.append(subprocess.Popen(words[:-1], env={**os.environ, "PATH": path}, cwd=workdir))
        return
    if words[0] == "curl":
        done = subprocess.run(words, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"failed: {command}\n{done.stderr}"
        answer = json.loads(done.stdout)
        assert len(answer["results"]) == 3 and all(r["reranker_score"] is not None for r in answer["results"])
        return
    if words[0] == "mmret":
        assert main(words[1:]) == 0, f"failed: {command}"
    elif words[0] == "python":
        done = subprocess.run(words, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"failed: {command}\n{done.stderr[-3000:]}"
    else:  # sbatch: submit, then the job must finish its training run
        done = subprocess.run(
            words,
            capture_output=True,
            text=True,
            timeout=60,
            env={**tour_cluster.env, "PATH": path, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 0, f"failed: {command}\n{done.stderr}"
        job_id = re.search(r"Submitted batch job (\d+)", done.stdout).group(1)
        state = tour_cluster.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
        log = workdir / f"slurm-mmret-{job_id}.out"
        assert state == "COMPLETED", log.read_text()[-4000:] if log.exists() else state
        assert (workdir / "runs" / "slurm" / f"mmret-{job_id}" / "checkpoints" / "last.ckpt").is_file()
