"""`mmret sweep`: grid x seeds expansion, run directories and the sbatch command of a dry run (no SLURM needed).

.venv/bin/pytest tests/test_sweep.py -q
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from mmret.cli import main
from mmret.sweep import SBATCH_SCRIPT, load_sweep, write_point_files

REPO = Path(__file__).resolve().parents[1]

SWEEP = f"""\
name: tiny
experiment: {REPO}/experiments/digits_clip.yaml
overrides: {{trainer.max_epochs: 1}}
grid:
  model.init_args.loss: [infonce, siglip]
  data.init_args.batch_size: [16, 32]
seeds: [0, 1]
max_parallel: 3
runs_root: out
wandb_project: mmret-test
eval: {{data: data/digits}}
sbatch: [--time=00:10:00]
"""


@pytest.fixture
def sweep_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(SWEEP)
    return path


def test_grid_times_seeds_in_array_order(sweep_file):
    points = load_sweep(sweep_file).points()
    assert [p.label for p in points] == [
        f"loss={loss},batch_size={batch},seed{seed}"
        for loss in ("infonce", "siglip")
        for batch in (16, 32)
        for seed in (0, 1)
    ]
    point = points[5]  # siglip, 16, seed 1
    assert point.run_dir == Path("out/tiny/loss=siglip,batch_size=16/seed1")
    assert point.tags == ["loss=siglip", "batch_size=16", "seed=1"]
    args = point.args
    assert args[:2] == ["-c", f"{REPO}/experiments/digits_clip.yaml"]
    pairs = dict(zip(args[2::2], args[3::2]))
    assert pairs["--trainer.max_epochs"] == "1"
    assert pairs["--model.init_args.loss"] == "siglip" and pairs["--data.init_args.batch_size"] == "16"
    assert pairs["--seed_everything"] == "1" and pairs["--run_dir"] == str(point.run_dir)
    assert (
        pairs["--wandb_group"] == "tiny" and pairs["--wandb_tags"] == "[loss=siglip, batch_size=16, seed=1]"
    )


def test_dry_run_prints_command_and_points_and_writes_nothing(sweep_file, tmp_path, capsys):
    assert main(["sweep", str(sweep_file), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# sweep tiny: 8 points, at most 3 at a time"
    assert out[1] == "[0] loss=infonce,batch_size=16,seed0  ->  out/tiny/loss=infonce,batch_size=16/seed0"
    assert shlex.split(out[-1]) == [
        "sbatch",
        "--array=0-7%3",
        "--job-name=tiny",
        "--output=out/tiny/slurm-%A_%a.out",
        "--export=ALL,MMRET_EVAL_DATA=data/digits,MMRET_EVAL_SPLIT=test",
        "--time=00:10:00",
        str(SBATCH_SCRIPT),
        "--sweep",
        "out/tiny/run_dirs.txt",
    ]
    assert not (tmp_path / "out").exists()


def test_point_files_are_what_the_sbatch_script_reads(sweep_file):
    sweep = load_sweep(sweep_file)
    listing = write_point_files(sweep)
    run_dirs = listing.read_text().splitlines()
    assert run_dirs == [str(p.run_dir) for p in sweep.points()]
    args = (Path(run_dirs[3]) / "sweep_args").read_bytes().split(b"\0")
    assert args[-1] == b"" and [a.decode() for a in args[:-1]] == sweep.points()[3].args


def test_a_seed_can_set_several_keys(sweep_file):
    sweep_file.write_text(SWEEP + "seed_key: [seed_everything, data.init_args.seed]\n")
    args = load_sweep(sweep_file).points()[1].args  # seed 1
    pairs = dict(zip(args[2::2], args[3::2]))
    assert pairs["--seed_everything"] == pairs["--data.init_args.seed"] == "1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\n", "needs `experiment`"),
        (
            f"name: x\nexperiment: {REPO}/experiments/digits_clip.yaml\ngrid: {{a: [1]}}\nseed_key: []\n",
            "seed_key",
        ),
        (f"name: x\nexperiment: {REPO}/experiments/digits_clip.yaml\ngrid: {{a: []}}\n", "non-empty list"),
        ("name: x\nexperiment: nope.yaml\ngrid: {a: [1]}\n", "experiment nope.yaml does not exist"),
        ("name: x\nexperiment: e\ngrid: {a: [1]}\nsed: [1]\n", "unknown keys ['sed']"),
    ],
)
def test_bad_sweep_file_is_one_line_exit_2(sweep_file, capsys, text, message):
    sweep_file.write_text(text)
    assert main(["sweep", str(sweep_file), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_shipped_sweeps_expand(monkeypatch):
    monkeypatch.chdir(REPO)
    for path in sorted((REPO / "experiments" / "sweeps").glob("*.yaml")):
        sweep = load_sweep(path)
        assert len(sweep.points()) == len(sweep.seeds) * len(
            list(__import__("itertools").product(*sweep.grid.values()))
        )
