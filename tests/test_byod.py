"""The README's "Bring your own data" section, run as written on real photographs with hand-written captions.

    .venv/bin/pytest tests/test_byod.py -q -m slow -s     # -s prints the measured R@1 of both recipes

The photos are crops of 23 photographs that ship inside scikit-image and scikit-learn (tests/photo_set.py), not
the project's own datasets: my_photos/ (92 crops, three captions each) and my_test.csv with my_test/ (one held-back
crop per photo, captioned with a paraphrase). Every command of the section's ```bash block runs in this process
through the console script's `main`, from a folder holding the repository's experiments/ (a link), with every
warning recorded: none may come from mmret or Lightning (its step arithmetic: warmup longer than the run, a
logging interval longer than an epoch). Then the same dual-encoder recipe with the tiny ViT towers (what the
README suggested before, trained from scratch on both sides) runs on the same data, and the custom recipe must
retrieve the held-back photos better.
"""

from __future__ import annotations

import json
import shlex
import warnings
from pathlib import Path

import pytest

from mmret.cli import main
from tests.photo_set import write_photo_set
from tests.test_readme_tour import section_commands

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Bring your own data"
METRIC = "image_retrieval_recall@1"  # text -> image: the held-back photo of each paraphrased query


COMMANDS = section_commands((REPO / "README.md").read_text(), SECTION)


def test_the_section_goes_from_raw_pairs_to_a_reranked_eval_with_the_custom_recipes():
    programs = [shlex.split(command)[:2] for command in COMMANDS]
    assert all(program[0] == "mmret" for program in programs)
    assert [program[1] for program in programs].count("shards") == 2  # a folder and a CSV
    fits = [command for command in COMMANDS if command.startswith("mmret fit ")]
    assert [shlex.split(fit)[3] for fit in fits] == [
        "experiments/custom_dual.yaml",
        "experiments/custom_reranker.yaml",
    ]
    assert any(command.startswith("mmret mine ") for command in COMMANDS)
    assert any(command.startswith("mmret eval ") and "--reranker" in command for command in COMMANDS)


def _ours_or_lightning(warning: warnings.WarningMessage) -> bool:
    """A warning a user would see from mmret or Lightning. (Deprecation warnings are hidden outside __main__ by
    Python's default filters: Lightning's calls of deprecated jsonargparse API never reach a user.)"""
    if issubclass(warning.category, DeprecationWarning):
        return False
    source = str(warning.filename)
    return "/mmret/" in source or "/lightning/" in source or "/lightning_fabric/" in source


def _run(command: str, capsys) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(shlex.split(command)[1:])
    err = capsys.readouterr().err
    assert code == 0, f"{command}\n{err[-3000:]}"
    noisy = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if _ours_or_lightning(w)]
    assert not noisy, f"{command} warned:\n" + "\n".join(noisy)
    assert not [line for line in err.splitlines() if "warn" in line.lower()], err[-3000:]
    return err


def recall(path: Path, key: str = "metrics") -> float:
    return json.loads(path.read_text())[key][METRIC]


@pytest.mark.slow
def test_bring_your_own_data_runs_as_written_and_beats_the_tiny_vit_recipe(tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "clone"
    workdir.mkdir()
    (workdir / "experiments").symlink_to(REPO / "experiments")
    write_photo_set(workdir)
    monkeypatch.chdir(workdir)
    for command in COMMANDS:
        _run(command, capsys)

    custom = recall(workdir / "runs/mine/results.json")
    reranked = recall(workdir / "runs/mine_reranker/results.json", "reranked_metrics")
    num_images = json.loads((workdir / "runs/mine/results.json").read_text())["num_images"]
    assert num_images == 23
    # What the README suggested before: the same recipe with the tiny ViT towers, trained from scratch.
    dual = next(command for command in COMMANDS if "custom_dual.yaml" in command)
    _run(f"{dual.replace('runs/mine', 'runs/tiny')} --model.init_args.model test-vit-tiny "
         "--model.init_args.lock_text false", capsys)  # fmt: skip
    _run("mmret eval --model runs/tiny/checkpoints/last.ckpt --data data/mine/test --output runs/tiny/results.json",
         capsys)  # fmt: skip
    tiny = recall(workdir / "runs/tiny/results.json")
    print(f"\nheld-back text->image R@1 over {num_images} photos: custom recipe {custom:.3f} "
          f"(+ reranker top-5 {reranked:.3f}), tiny-ViT recipe {tiny:.3f}")  # fmt: skip
    assert custom > tiny
