"""`mmret fit` under faults and bad input (issue 21): one fit per run directory (an flock held for the run's
life), nothing left behind by a refused fit, one-line config and constructor errors, resume from the newest
intact checkpoint, and SIGINT / SIGTERM saving last.ckpt at the batch boundary.

    .venv/bin/pytest tests/test_fit_faults.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from mmret.cli import main
from mmret.errors import UsageError
from mmret.training.run_dir import RUN_DIR_ENV
from tests.fit_args import CROSS_ENCODER, DUAL_ENCODER, fit_argv
from tests.test_preemption import EPOCHS, logged, preemption_argv
from tests.test_resume import metrics_rows

REPO = Path(__file__).resolve().parents[1]
LOCK_NAME = "fit.lock"  # RUN_DIR/fit.lock, as the README says
ENV = {**os.environ, "PYTHONPATH": str(REPO), RUN_DIR_ENV: ""}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


class SlowSteps(Callback):
    """Writes the number of finished steps to the file `progress` after every training batch, then sleeps
    `seconds` (or until the file `wait_for` exists), so that a signal or a second fit from outside lands mid-fit.
    (metrics.csv is no sign of progress: the CSV logger writes it every 100 steps and at the end.)"""

    def __init__(self, progress: str, seconds: float = 1.0, wait_for: str | None = None) -> None:
        self.progress = progress
        self.seconds = seconds
        self.wait_for = wait_for

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        Path(self.progress).write_text(str(trainer.global_step))
        deadline = time.monotonic() + 300
        while self.wait_for and not os.path.exists(self.wait_for) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.wait_for:
            time.sleep(self.seconds)


def slow(progress: Path, seconds: float = 1.0, wait_for: Path | None = None) -> list[str]:
    init_args = {
        "progress": str(progress),
        "seconds": seconds,
        "wait_for": str(wait_for) if wait_for else None,
    }
    return [
        "--trainer.callbacks+",
        json.dumps({"class_path": f"{__name__}.SlowSteps", "init_args": init_args}),
    ]


def steps_done(progress: Path) -> int:
    try:
        return int(progress.read_text() or 0)
    except (OSError, ValueError):
        return 0


def run_fit(argv: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmret.cli", *argv], cwd=cwd, env=ENV, text=True, **kwargs)


# ---- the run-directory lock ------------------------------------------------------------------------------


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """A real process holding RUN_DIR's lock (through RunDirClaim) until killed."""
    code = (
        "import sys, time; from mmret.training.run_dir import RunDirClaim; "
        f"c = RunDirClaim({str(run_dir)!r}); print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_run_dir_is_refused_naming_the_holder_and_a_dead_holder_never_blocks(tmp_path):
    from mmret.training.run_dir import RunDirClaim

    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(UsageError) as refused:
            RunDirClaim(run_dir)
        message = str(refused.value)
        assert f"PID {holder.pid}" in message and "since" in message and "host" in message
        assert "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid  # its record is still there
    claim = RunDirClaim(run_dir)  # ... but the kernel released the lock of the dead process
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    claim.release(succeeded=True)
    assert run_dir.is_dir()


@pytest.mark.slow
def test_two_concurrent_fits_on_one_run_dir_the_second_exits_2_in_one_line(tmp_path, digits_root):
    run_dir = tmp_path / "run"
    argv = preemption_argv(run_dir, digits_root.parent)
    go_on, progress = tmp_path / "go_on", tmp_path / "progress"  # the first fit waits after its first step
    first = run_fit(
        [*argv, *slow(progress, wait_for=go_on)], tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    while time.time() < deadline and steps_done(progress) < 1 and first.poll() is None:
        time.sleep(0.1)
    assert first.poll() is None, first.stderr.read()[-3000:]

    second = subprocess.run(
        [sys.executable, "-m", "mmret.cli", *argv, "--seed_everything", "1"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 2, second.stderr[-3000:]
    lines = error_lines(second.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"mmret fit: error: run directory {run_dir} is in use")
    assert f"PID {first.pid} on host" in lines[0] and "since" in lines[0]
    assert first.poll() is None  # the first run goes on undisturbed
    go_on.touch()
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    steps = [int(row["step"]) for row in metrics_rows(run_dir) if row.get("train/loss")]
    assert steps == list(range(EPOCHS))  # each step once, in order
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if "-v" in p.name]
    assert "seed_everything: 0" in (run_dir / "config.yaml").read_text()  # not the second run's seed


# ---- bad input: one line, exit 2, nothing left behind ------------------------------------------------------


def _tiny(run_dir: Path, train: Path, **options) -> list[str]:
    return fit_argv(
        module=DUAL_ENCODER, train=train, samples_per_epoch=16, max_epochs=1, run_dir=run_dir, **options
    )


@pytest.mark.parametrize(
    "case",
    ["bad data path", "batch size 0", "negative batch size", "accumulate_grad_batches", "bad mined negatives",
     "not a checkpoint as dual_encoder"],
)  # fmt: skip
def test_a_fit_refused_for_bad_input_says_one_line_and_leaves_no_run_dir(case, in_tmp, digits_root, capsys):
    run_dir = in_tmp / "run"
    train = digits_root / "val"
    junk = in_tmp / "junk.ckpt"
    junk.write_text("not a checkpoint\n")
    argv = {
        "bad data path": _tiny(run_dir, in_tmp / "missing"),
        "batch size 0": _tiny(run_dir, train, batch_size=0),
        "negative batch size": _tiny(run_dir, train, batch_size=-4),
        "accumulate_grad_batches": _tiny(run_dir, train, trainer_args={"accumulate_grad_batches": 2}),
        "bad mined negatives": _tiny(run_dir, train, data_args={"mined_negatives": junk}),
        "not a checkpoint as dual_encoder": fit_argv(
            module=CROSS_ENCODER, model=None, model_args={"dual_encoder": junk}, train=train, run_dir=run_dir
        ),
    }[case]
    assert main(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    errors = [line for line in lines if line.startswith("mmret fit: error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    assert not run_dir.exists()


def test_a_refused_fit_is_one_line_on_stderr_of_a_real_process(in_tmp, digits_root):
    """What a user sees in the terminal: no Lightning device census, logger advert or srun hint first."""
    run_dir = in_tmp / "run"
    refused = subprocess.run(
        [sys.executable, "-m", "mmret.cli", *_tiny(run_dir, in_tmp / "missing")],
        cwd=in_tmp, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert error_lines(refused.stderr) == [error_lines(refused.stderr)[-1]], refused.stderr
    assert error_lines(refused.stderr)[0].startswith("mmret fit: error: train data:"), refused.stderr
    assert not run_dir.exists()


def test_an_open_clip_pretrained_tag_offline_is_one_line_without_retries(in_tmp, digits_root):
    """The hub cannot be reached here: one line naming what to fetch, no ~50 s of huggingface_hub retries."""
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    argv = _tiny(in_tmp / "run", digits_root / "val")
    argv += ["--model.model", "ViT-B-32", "--model.pretrained", "openai"]
    refused = subprocess.run([sys.executable, "-m", "mmret.cli", *argv], cwd=in_tmp, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = error_lines(refused.stderr)
    assert len(lines) == 1 and "Retrying" not in refused.stderr, refused.stderr[-3000:]
    assert "could not download pretrained weights 'openai' for model 'ViT-B-32'" in lines[0]
    assert "cannot be reached" in lines[0] and "HF_HOME" in lines[0]
    assert not (in_tmp / "run").exists()


def test_a_refused_fit_does_not_touch_an_existing_run_dir(in_tmp, digits_root, capsys):
    run_dir = in_tmp / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("earlier: run\n")
    argv = _tiny(run_dir, digits_root / "val", trainer_args={"accumulate_grad_batches": 2})
    assert main(argv) == 2
    assert "accumulate_grad_batches" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == "earlier: run\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", LOCK_NAME]


@pytest.mark.parametrize(
    "extra, config, expected",
    [
        (["--model.lrr", "0.1"], None, ["model.lrr", "did you mean model.lr?"]),
        (["--model.lr", "abc"], None, ["model.lr: expected float, got 'abc'"]),
        (["--trainer.max_epocs", "3"], None, ["--trainer.max_epocs", "did you mean --trainer.max_epochs"]),
        (["--trainer.max_epochs", "x"], None, ["trainer.max_epochs: expected int", "'x'"]),
        (["--chekpoint_every_n_steps", "3"], None, ["did you mean --checkpoint_every_n_steps"]),
        ([], "missing.yaml", ["config: file does not exist", "missing.yaml"]),
        ([], "trainer:\n  max_epocs: 3\n", ["trainer.max_epocs", "did you mean trainer.max_epochs"]),
        ([], "model:\n  class_path: mmret.training.DualEncoder\n  init_args:\n    warmup_steps: many\n",
         ["model.warmup_steps: expected int or float", "'many'"]),
    ],
)  # fmt: skip
def test_config_errors_are_short_and_name_the_key(extra, config, expected, in_tmp, digits_root, capsys):
    run_dir = in_tmp / "run"
    if config is None:
        argv = [*_tiny(run_dir, digits_root / "val"), *extra]
    else:
        path = in_tmp / ("missing.yaml" if config == "missing.yaml" else "bad.yaml")
        if config != "missing.yaml":
            path.write_text(config)
        argv = ["fit", "-c", str(path), "--run_dir", str(run_dir)]
    assert main(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert 1 <= len(lines) <= 5, lines
    text = "\n".join(lines)
    assert text.startswith("mmret fit: error: ")
    for part in expected:
        assert part in text, (part, text)
    assert not run_dir.exists()


# ---- resume from the newest intact checkpoint --------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "never written"])
def test_a_truncated_last_ckpt_resumes_from_the_intact_step_checkpoint(damage, in_tmp, digits_root, capsys):
    """A full disk cut last.ckpt short (or the first last.ckpt was never written): the run resumes from the
    step checkpoint beside it and says so, instead of failing in Lightning's loader or starting at step 0."""
    run_dir = in_tmp / "run"

    def argv(epochs: int) -> list[str]:
        return fit_argv(
            module=DUAL_ENCODER, model_args={"warmup_steps": 1}, train=digits_root / "val", samples_per_epoch=64,
            batch_size=16, max_epochs=epochs, limit_val_batches=0, log_every_n_steps=1, run_dir=run_dir,
            extra=["--checkpoint_every_n_steps", "3"],
        )  # fmt: skip

    assert main(argv(1)) == 0  # 4 steps: step0000003.ckpt, last.ckpt at step 4
    last, step3 = run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "step0000003.ckpt"
    assert torch.load(step3, weights_only=False)["global_step"] == 3
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    else:
        last.unlink()
    capsys.readouterr()

    assert main(argv(2)) == 0
    err = capsys.readouterr().err
    resumed = [line for line in err.splitlines() if "resuming from" in line]
    skipped = "; skipped unreadable last.ckpt" if damage == "truncated" else ""
    assert resumed == [f"mmret: resuming from {step3} (step 3){skipped}"], err[-2000:]
    assert torch.load(last, weights_only=False)["global_step"] == 8
    steps = [int(row["step"]) for row in metrics_rows(run_dir) if row.get("train/loss")]
    assert steps[4:] == list(range(3, 8))  # the resumed run started at step 3, not 0


def test_checkpoints_that_are_all_unreadable_refuse_instead_of_restarting(in_tmp, digits_root, capsys):
    run_dir = in_tmp / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    assert main(_tiny(run_dir, digits_root / "val")) == 2
    errors = [line for line in error_lines(capsys.readouterr().err) if "error" in line]
    assert len(errors) == 1 and "none is readable" in errors[0] and "last.ckpt" in errors[0], errors
    assert not (run_dir / "metrics.csv").exists()


# ---- SIGINT / SIGTERM: last.ckpt at the batch boundary, then the same end as an uninterrupted run -------------


@pytest.mark.slow
# Ctrl-C in a terminal and `scancel` reach the whole process group (data loader workers too); `kill` only the
# process. (Before the workers ignored these signals, a SIGTERM to the group killed them first and the fit
# died without saving.)
@pytest.mark.parametrize(
    "signum, code, group",
    [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False), (signal.SIGTERM, 143, True)],
    ids=["sigint-group", "sigterm-process", "sigterm-group"],
)
def test_a_signal_mid_fit_saves_and_the_rerun_ends_like_an_uninterrupted_run(
    signum, code, group, tmp_path, digits_root
):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = run_fit(preemption_argv(straight, digits_root.parent), tmp_path, stderr=subprocess.PIPE)

    progress = tmp_path / "progress"
    process = run_fit(
        [*preemption_argv(stopped, digits_root.parent), *slow(progress, seconds=1.0)],
        tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and steps_done(progress) < 2:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read()[-3000:]
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    assert process.wait(timeout=300) == code, process.stderr.read()[-3000:]
    stderr = process.stderr.read()
    assert "Traceback" not in stderr, stderr[-3000:]
    for noise in ("GPU available", "TPU available", "litlogger", "The `srun` command"):
        assert noise not in stderr, stderr[-3000:]
    saved = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert 1 <= saved["global_step"] < EPOCHS, saved["global_step"]
    assert f"at step {saved['global_step']}; saved" in stderr

    rerun = subprocess.run(
        [sys.executable, "-m", "mmret.cli", *preemption_argv(stopped, digits_root.parent)],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {stopped / 'checkpoints' / 'last.ckpt'}" in rerun.stderr
    assert done.wait(timeout=600) == 0, done.stderr.read()[-3000:]

    losses, validations = logged(stopped)
    straight_losses, straight_validations = logged(straight)
    assert sorted(losses) == list(range(EPOCHS))
    assert losses == pytest.approx(straight_losses, abs=1e-6)
    assert validations == pytest.approx(straight_validations, abs=1e-6)
    final, straight_final = (
        torch.load(d / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
        for d in (stopped, straight)
    )
    assert final["global_step"] == straight_final["global_step"] == EPOCHS
    for name, tensor in straight_final["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)
