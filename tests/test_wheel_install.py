"""mmret installed from its wheel (not editable) works from any directory: the commands find the files they
ship (the demo's recipes, the sbatch template, the shipped sweeps) as package data.

    .venv/bin/pytest tests/test_wheel_install.py -q -m slow

The wheel is built from this checkout and installed with `pip install --no-deps --target` beside the venv's
dependencies; the commands then run with `python -m mmret` in a folder outside the repository, with that
target first on the path (checked: `mmret` is imported from the wheel's copy, not from the checkout).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A folder holding mmret installed from a freshly built wheel."""
    base = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(base / "dist"), str(REPO)],
                   check=True, timeout=300, capture_output=True)  # fmt: skip
    (wheel,) = (base / "dist").glob("mmret-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(name for name in names if name.endswith("entry_points.txt"))
        assert "mmret = mmret.cli:entry_point" in archive.read(entry_points).decode()
    for shipped in ("experiments/demo/pipeline.yaml", "experiments/demo/shapes_reranker.yaml",
                    "experiments/sweeps/digits_loss_batch.yaml", "experiments/digits_clip.yaml",
                    "slurm/train.sbatch"):  # fmt: skip
        assert f"mmret/shipped/{shipped}" in names, shipped
    subprocess.run([*pip, "install", "--no-deps", "--target", str(base / "site"), str(wheel)],
                   check=True, timeout=300, capture_output=True)  # fmt: skip
    return base / "site"


def run_mmret(site: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "mmret", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_the_wheel_is_what_runs(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    where = subprocess.run([sys.executable, "-c", "import mmret; print(mmret.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(installed)


def test_help_and_a_shipped_sweep_dry_run_from_outside_the_repo(installed, tmp_path):
    help_run = run_mmret(installed, tmp_path, "--help")
    assert help_run.returncode == 0 and "demo" in help_run.stdout and "sweep" in help_run.stdout
    sweep = run_mmret(installed, tmp_path, "sweep", "experiments/sweeps/digits_loss_batch.yaml", "--dry-run")
    assert sweep.returncode == 0, sweep.stderr
    assert "# sweep digits_loss_batch: 36 points" in sweep.stdout
    sbatch_line = sweep.stdout.strip().splitlines()[-1]
    assert str(installed / "mmret" / "shipped" / "slurm" / "train.sbatch") in sbatch_line
    assert str(installed / "mmret" / "shipped" / "experiments" / "digits_clip.yaml") in sweep.stdout
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_the_quick_demo_runs_from_outside_the_repo(installed, tmp_path):
    demo = run_mmret(installed, tmp_path, "demo", "--quick", "--output", "D")
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "shapes: text→image R@1" in demo.stdout
    assert (tmp_path / "D" / "results.md").is_file()
    assert (tmp_path / "D" / "runs" / "shapes_reranker" / "checkpoints" / "last.ckpt").is_file()
