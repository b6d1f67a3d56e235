"""`mmret sweep`: grid x seeds expansion, run directories and the sbatch command of a dry run (no SLURM needed).

.venv/bin/pytest tests/test_sweep.py -q
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import yaml

from mmret.cli import main
from mmret.reporting.sweeps import SBATCH_SCRIPT, Point, Sweep, load_sweep, write_point_files
from mmret.resources import shipped_path

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
        str(shipped_path(SBATCH_SCRIPT)),
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


SHIPPED_SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))


def printed_config(fit_args: list[str], capsys) -> dict:
    """The config `mmret fit FIT_ARGS --print_config` prints, in process: LightningCLI parses and validates
    every option, prints and exits 0 before anything is instantiated (no run directory, no DDP launch). An
    option it does not know exits non-zero: that SystemExit propagates."""
    capsys.readouterr()
    try:
        code = main(["fit", *fit_args, "--print_config"])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    else:
        if code:  # a refused option: one line and exit code 2 from `mmret fit` itself
            raise SystemExit(code)
        pytest.fail("`mmret fit --print_config` returned instead of exiting")
    return yaml.safe_load(capsys.readouterr().out)


def config_value(config: dict, dotted_key: str):
    value = config
    for part in dotted_key.split("."):
        assert isinstance(value, dict) and part in value, f"{dotted_key}: no {part!r} in the printed config"
        value = value[part]
    return value


def covering_points(sweep: Sweep) -> list[Point]:
    """The first point of each grid value and of each seed, in array order: every value and every seed reaches
    the parser at least once (the full product would parse the same options again and again)."""
    chosen, seen = [], set()
    for point in sweep.points():
        labels = {f"{key}={value!r}" for key, value in point.values.items()} | {f"seed={point.seed}"}
        if not labels <= seen:
            chosen.append(point)
            seen |= labels
    return chosen


def check_points_parse(sweep: Sweep, tmp_path: Path, capsys) -> None:
    """The covering points' `mmret fit` arguments (with --run_dir moved under tmp_path) pass LightningCLI's
    parser, and the config it would run holds each point's overrides, grid values and seed."""
    seed_keys = [sweep.seed_key] if isinstance(sweep.seed_key, str) else sweep.seed_key
    for point in covering_points(sweep):
        run_dir = tmp_path / point.run_dir
        config = printed_config([*point.args, "--run_dir", str(run_dir)], capsys)
        expected = {**sweep.overrides, **point.values, **dict.fromkeys(seed_keys, point.seed)}
        for key, value in expected.items():
            assert config_value(config, key) == value, (point.label, key)
        assert config["run_dir"] == str(run_dir)


def test_there_are_shipped_sweeps():
    assert {path.stem for path in SHIPPED_SWEEPS} >= {"digits_loss_batch", "shapes_loss_batch"}


@pytest.mark.parametrize("path", SHIPPED_SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweep_points_are_valid_fit_configs(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(
        tmp_path
    )  # the sweep's relative `experiment:` resolves to the shipped file from anywhere
    sweep = load_sweep(path)
    points = covering_points(sweep)
    for key, values in sweep.grid.items():
        assert [v for v in values if not any(p.values[key] == v for p in points)] == [], key
    check_points_parse(sweep, tmp_path, capsys)


def test_a_misspelt_grid_key_fails_the_parser_check(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = shipped_path("experiments/sweeps/digits_loss_batch.yaml").read_text()
    assert "\n  model.init_args.loss: " in text
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text(text.replace("\n  model.init_args.loss: ", "\n  model.init_args.lossy: "))
    sweep = load_sweep(misspelt)
    assert "model.init_args.lossy" in sweep.grid  # the sweep itself loads: only LightningCLI knows the keys
    with pytest.raises(SystemExit) as exit_:
        check_points_parse(sweep, tmp_path, capsys)
    assert exit_.value.code == 2
    assert "lossy" in capsys.readouterr().err


# ---- issue 21: checked before anything is written or submitted; a failed submission leaves nothing behind


def misspelt_sweep(tmp_path: Path, old: str, new: str) -> Path:
    text = shipped_path("experiments/sweeps/digits_loss_batch.yaml").read_text()
    assert old in text
    path = tmp_path / "bad_sweep.yaml"
    path.write_text(text.replace(old, new).replace("runs_root: runs/sweeps", "runs_root: out"))
    return path


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "\n  model.init_args.loss: ",
            "\n  model.init_args.lossy: ",
            "grid key model.init_args.lossy = infonce is refused by the config of",
        ),
        ("[16, 64, 256]", "[16, 64, lots]", "grid key data.init_args.batch_size = lots is refused"),
        ("[infonce, siglip]", "[infonce, sigmoid]", "grid key model.init_args.loss = sigmoid is refused"),
        ("{trainer.strategy: ddp}", "{trainer.max_epochz: 3}", "the experiment with `overrides` and seed 0"),
        ("data.init_args.seed]", "data.init_args.sed]", "the experiment with `overrides` and seed 0"),
    ],
    ids=["misspelt-key", "wrong-type", "not-a-choice", "bad-override", "bad-seed-key"],
)
def test_dry_run_refuses_what_fit_would_refuse_in_one_line(tmp_path, monkeypatch, capsys, old, new, message):
    monkeypatch.chdir(tmp_path)
    path = misspelt_sweep(tmp_path, old, new)
    assert main(["sweep", str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before a single point is printed
    assert message in captured.err and "experiments/digits_clip.yaml" in captured.err
    assert captured.err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def fake_sbatch(tmp_path: Path, monkeypatch, script: str) -> None:
    """An `sbatch` first on PATH that runs `script` (a shell snippet)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_a_failed_submission_removes_what_it_wrote(sweep_file, tmp_path, monkeypatch, capsys):
    fake_sbatch(tmp_path, monkeypatch, 'echo "sbatch: error: invalid partition specified: gpu" >&2\nexit 1')
    assert main(["sweep", str(sweep_file)]) == 2
    err = capsys.readouterr().err
    assert "sbatch failed" in err and "invalid partition specified: gpu" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # no run_dirs.txt, no sweep_args, no empty run directories


def test_a_failed_resubmission_keeps_the_earlier_runs(sweep_file, tmp_path, monkeypatch, capsys):
    sweep = load_sweep(sweep_file)
    write_point_files(sweep)  # an earlier submission: its runs have started
    first = sweep.points()[0].run_dir
    (first / "checkpoints").mkdir()
    (first / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (first / "sweep_args").write_bytes(b"earlier\0")
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "out").rglob("*"))
    fake_sbatch(tmp_path, monkeypatch, "exit 3")
    assert main(["sweep", str(sweep_file)]) == 2
    assert "sbatch failed" in capsys.readouterr().err
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "out").rglob("*")) == before
    assert (first / "sweep_args").read_bytes() == b"earlier\0"
    assert (first / "checkpoints" / "last.ckpt").read_bytes() == b"weights"


def test_sbatch_not_found_removes_what_it_wrote(sweep_file, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["sweep", str(sweep_file)]) == 2
    assert "sbatch was not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_submission_keeps_its_point_files(sweep_file, tmp_path, monkeypatch, capsys):
    fake_sbatch(tmp_path, monkeypatch, 'echo "Submitted batch job 42"')
    assert main(["sweep", str(sweep_file)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "Submitted batch job 42"
    run_dirs = (tmp_path / "out/tiny/run_dirs.txt").read_text().splitlines()
    assert len(run_dirs) == 8 and all((Path(d) / "sweep_args").is_file() for d in run_dirs)
