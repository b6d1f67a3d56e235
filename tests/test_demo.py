"""Tests of `mmret demo`: the whole pipeline in its `--quick` form, reuse of finished stages, reruns after a
settings change, determinism, and one-line errors.

.venv/bin/pytest tests/test_demo.py -q
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml

from mmret.cli import main
from mmret.cli.demo import PIPELINE as PIPELINE_NAME
from mmret.cli.demo import STAGES
from mmret.resources import shipped_path
from tests.demo_fixture import quick_demo  # noqa: F401  (fixture)

PIPELINE = shipped_path(PIPELINE_NAME)

TABLE_LINE = re.compile(r"^\|.*\|$", re.MULTILINE)


def table_of(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in TABLE_LINE.findall(text)]


@pytest.mark.slow
def test_quick_demo_runs_every_stage_in_order_and_prints_the_table(quick_demo):  # noqa: F811
    printed, output = quick_demo.printed, quick_demo.output
    positions = []
    for number, stage in enumerate(STAGES, 1):
        head = f"[{number}/{len(STAGES)}] {stage.title} (~"
        assert head in printed, f"no stage line {head!r} in:\n{printed}"
        positions.append(printed.index(head))
    assert positions == sorted(positions)
    assert printed.count("done in ") == len(STAGES)
    # Training shows progress lines; every command is printed as it can be typed.
    assert re.search(r"step +3/3 +loss \d", printed)
    assert "mmret fit -c " in printed and "experiments/demo/shapes_reranker.yaml" in printed
    assert "mmret eval --model " in printed and "--reranker " in printed and "mmret mine --model " in printed

    for name in ("digits", "shapes"):
        assert (output / "data" / name / "test" / "dataset.json").is_file()
    for run in ("digits_dual", "shapes_dual", "shapes_reranker"):
        assert (output / "runs" / run / "checkpoints" / "last.ckpt").is_file()
        assert (output / "runs" / run / "config.yaml").is_file()  # re-runnable with `mmret fit -c`
    header = json.loads((output / "mined" / "shapes.jsonl").read_text().splitlines()[0])
    assert header["format"] == "mmret-mined-negatives" and header["counts"]["negatives"] > 0
    for stem in ("digits_zeroshot", "shapes_retrieval", "shapes_rerank"):
        assert (output / f"{stem}.json").is_file()
        assert (output / f"{stem}_examples.png").stat().st_size > 0
        assert (output / f"{stem}_recall.png").stat().st_size > 0

    # One table, on stdout and in results.md (beside the PNGs it links), whose numbers are those of the JSONs.
    results_md = (output / "results.md").read_text()
    rows = table_of(printed)
    assert rows == table_of(results_md)
    assert rows[0] == ["result (test split, %)", "model", "all", "seen", "unseen"]
    for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", results_md):
        assert (output / picture).is_file()
    digits = json.loads((output / "digits_zeroshot.json").read_text())
    dual = json.loads((output / "shapes_retrieval.json").read_text())
    reranked = json.loads((output / "shapes_rerank.json").read_text())
    assert rows[2][:3] == [
        "digits: zero-shot top-1",
        "dual encoder",
        f"{100 * digits['metrics']['acc1']:.1f}",
    ]
    by_label = {}
    label = None
    for row in rows[3:]:
        label = row[0] or label
        by_label[(label, row[1])] = row[2:]
    top_k = reranked["top_k"]
    for metric, name in [
        ("text→image R@1", "image_retrieval_recall@1"),
        ("image→text R@5", "text_retrieval_recall@5"),
    ]:
        for model, source in [
            ("dual encoder", dual["metrics"]),
            (f"+ reranker (top-{top_k})", reranked["reranked_metrics"]),
        ]:
            expected = [f"{100 * source[key]:.1f}" for key in (name, f"seen/{name}", f"unseen/{name}")]
            assert by_label[(f"shapes: {metric}", model)] == expected
    # The dual encoder's numbers do not depend on the reranker's evaluation run.
    assert reranked["metrics"] == dual["metrics"]


@pytest.mark.slow
def test_second_run_reuses_every_stage_and_prints_the_same_table(quick_demo, capsys):  # noqa: F811
    checkpoint = quick_demo.output / "runs" / "shapes_dual" / "checkpoints" / "last.ckpt"
    modified = checkpoint.stat().st_mtime_ns
    assert main(["demo", "--output", str(quick_demo.output), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before, reusing") == len(STAGES)
    assert "done in " not in printed
    assert table_of(printed) == table_of(quick_demo.printed)
    assert checkpoint.stat().st_mtime_ns == modified


@pytest.mark.slow
def test_changed_settings_rerun_that_stage_and_its_dependants(quick_demo, tmp_path, capsys):  # noqa: F811
    output = tmp_path / "demo"
    shutil.copytree(quick_demo.output, output)
    settings = yaml.safe_load(PIPELINE.read_text())
    settings["quick"]["digits_dual"]["args"] = {
        **settings["quick"]["digits_dual"]["args"],
        "trainer.max_steps": 2,
    }
    changed = tmp_path / "pipeline.yaml"
    changed.write_text(yaml.safe_dump(settings, sort_keys=False))
    for name in ("digits_dual.yaml", "shapes_dual.yaml", "shapes_reranker.yaml"):
        shutil.copy(PIPELINE.parent / name, tmp_path / name)

    assert main(["demo", "--output", str(output), "--quick", "--pipeline", str(changed)]) == 0
    printed = capsys.readouterr().out
    rerun = [stage.name for stage in STAGES if f"{stage.title} (~" in printed]
    assert rerun == ["digits_dual", "digits_eval"]  # and not the shapes stages, which do not read them
    last = torch.load(
        output / "runs/digits_dual/checkpoints/last.ckpt", map_location="cpu", weights_only=False
    )
    assert last["global_step"] == 2  # trained afresh, not resumed from the 3-step run

    # Back to the original settings: the same two stages run again and give the original numbers exactly.
    assert main(["demo", "--output", str(output), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert [stage.name for stage in STAGES if f"{stage.title} (~" in printed] == [
        "digits_dual",
        "digits_eval",
    ]
    again = json.loads((output / "digits_zeroshot.json").read_text())
    assert again["metrics"] == json.loads((quick_demo.output / "digits_zeroshot.json").read_text())["metrics"]


def test_output_that_is_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("mine")
    assert main(["demo", "--output", str(target), "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output" in err[0] and str(target) in err[0]
    assert target.read_text() == "mine"


def test_non_empty_folder_that_is_not_a_demo_output_is_refused(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("keep me")
    assert main(["demo", "--output", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no demo output" in err[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["thesis.tex"]


def test_broken_pipeline_file_is_one_line_and_exit_2(tmp_path, capsys):
    broken = tmp_path / "pipeline.yaml"
    broken.write_text("datasets: {seed: 0}\n")
    assert main(["demo", "--output", str(tmp_path / "out"), "--pipeline", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no settings for stage(s) digits_dual" in err[0]
    assert not (tmp_path / "out").exists()


def test_shipped_pipeline_names_every_stage_and_existing_recipes():
    settings = yaml.safe_load(PIPELINE.read_text())
    for stage in STAGES:
        assert stage.name in settings and "seconds" in settings[stage.name]
        if "config" in settings[stage.name]:
            recipe = PIPELINE.parent / settings[stage.name]["config"]
            assert recipe.read_text().startswith(f"# mmret fit -c experiments/demo/{recipe.name}")
            assert "Expected" in recipe.read_text()
    assert set(settings["quick"]) <= {stage.name for stage in STAGES}
