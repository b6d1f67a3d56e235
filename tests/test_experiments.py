"""Every shipped experiment YAML: its header says how to run it and what to expect, and its smoke form
(model swapped for a tiny `test-*` config, a few steps on real digits shards, CPU) trains and validates.

    .venv/bin/pytest tests/test_experiments.py -q
"""

from __future__ import annotations

import csv
import re
import shlex
from pathlib import Path

import pytest
import yaml

from mmret.cli import main
from tests.fit_args import fit_options

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def test_there_are_experiments():
    names = {path.stem for path in EXPERIMENTS}
    assert {"digits_clip", "digits_siglip", "shapes_dual", "clip_vitb32_finetune"} <= names


RUNTIME = re.compile(r"~?\d+(\.\d+)?\s*(s|sec|seconds?|min|minutes?|h|hours?)\b")
RESULT = re.compile(
    r"(R@\d|acc1|recall|top-1|loss|NDCG)[^.]*?\d\.\d+|\d\.\d+[^.]*?(R@\d|acc1|recall|top-1)", re.I
)


def header_command(path: Path) -> list[str]:
    """The `mmret ...` command on the header's first line, as argv after `mmret` (a trailing comment cut off)."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# mmret "), f"{path.name}: the header must begin with the command that runs it"
    command = shlex.split(first.removeprefix("#").split("  (")[0].split("    ")[0])
    assert command[0] == "mmret"
    return command[1:]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_header_states_command_runtime_and_result(path):
    assert header_command(path)[:3] == ["fit", "-c", f"experiments/{path.name}"]
    header = " ".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "Expected" in header
    assert RUNTIME.search(header), f"{path.name}: the header states no runtime (a number and a time unit)"
    assert RESULT.search(header), f"{path.name}: the header states no expected result (a metric and a number)"
    config = yaml.safe_load(path.read_text())
    assert config["model"]["class_path"].startswith("mmret.")
    assert config["data"]["class_path"].startswith("mmret.")


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_smoke_form_trains_and_validates(path, tmp_path, digits_root, monkeypatch):
    """The header's own command, run from the repository root with the smoke overrides appended."""
    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    smoke = fit_options(
        init_args=True, pretrained="null", dataset="null", train=digits_root / "train",
        val=digits_root / "val", samples_per_epoch=64, max_epochs=1, devices=1, strategy="auto",
        precision="32-true", log_every_n_steps=1, run_dir=run_dir,
    )  # fmt: skip
    command = header_command(path)
    # Inputs the header takes from earlier steps (runs/... checkpoints, mined files) are replaced by none: the
    # towers then come from the smoke model, as the reranker recipe allows.
    earlier = [
        part for option, value in zip(command, command[1:])
        if value.startswith("runs/") and option != "--run_dir" for part in (option, "null")
    ]  # fmt: skip
    if yaml.safe_load(path.read_text())["model"]["init_args"].get("matryoshka_dims"):
        # the recipe's prefix widths are its model's; the smoke model embeds into 32 dims
        smoke += ["--model.init_args.matryoshka_dims", "[16, 8]"]
    code = main([*command, *earlier, *smoke])
    assert code == 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "run_info.json").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("train/loss") for row in rows)
    assert any(row.get("val/image_retrieval_recall@1") for row in rows)
