"""`mmret table` against a hand-made set of results files: exact markdown and LaTeX, seeds, bold (per data set,
only where two rows compare), first-stage and reranked results mixed, errors; every shipped table spec renders
from the runs of its sweep.

.venv/bin/pytest tests/test_tables.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmret.cli import main
from mmret.reporting.sweeps import load_sweep
from mmret.reporting.tables import load_table_spec

REPO = Path(__file__).resolve().parents[1]

SPEC = """\
title: Loss on digits
label: tab:loss
decimals: 1
columns:
  - {name: "T->I R@1", metric: image_retrieval_recall@1}
  - {name: "I->T R@1", metric: text_retrieval_recall@1}
  - {name: rerank R@1, metric: image_retrieval_recall@1, source: reranked_metrics}
  - {name: loss, metric: loss, higher_is_better: false}
rows:
  - {name: InfoNCE, results: "runs/infonce/seed*/results.json"}
  - {name: SigLIP_b32, results: ["runs/siglip/results.json"]}
"""

EXPECTED_MARKDOWN = """\
**Loss on digits**

|  | T->I R@1 | I->T R@1 | rerank R@1 | loss |
| --- | ---: | ---: | ---: | ---: |
| InfoNCE | **50.0 ± 10.0** | 70.0 ± 0.0 | 60.0 ± 0.0 | 2.0 ± 1.0 |
| SigLIP_b32 | 45.0 | **80.0** | **65.0** | **1.0** |

_mean ± std over 1–3 seeds; best per column in bold._
"""

EXPECTED_LATEX = r"""\begin{table}[t]
\centering
\caption{Loss on digits (mean $\pm$ std over 1–3 seeds; best in bold)}
\label{tab:loss}
\begin{tabular}{lrrrr}
\toprule
 & T->I R@1 & I->T R@1 & rerank R@1 & loss \\
\midrule
InfoNCE & \textbf{50.0 $\pm$ 10.0} & 70.0 $\pm$ 0.0 & 60.0 $\pm$ 0.0 & 2.0 $\pm$ 1.0 \\
SigLIP\_b32 & 45.0 & \textbf{80.0} & \textbf{65.0} & \textbf{1.0} \\
\bottomrule
\end{tabular}
\end{table}
"""


def write_results(
    path: Path, t2i: float, i2t: float, reranked: float, loss: float, acc1: float | None = None
):
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {
        "image_retrieval_recall@1": t2i,
        "image_retrieval_recall@5": t2i + 0.1,
        "text_retrieval_recall@1": i2t,
        "text_retrieval_recall@5": i2t + 0.1,
        "loss": loss / 100,
    }
    if acc1 is not None:
        metrics["acc1"] = acc1
    path.write_text(
        json.dumps(
            {
                "task": "retrieval",
                "model": "m.ckpt",
                "data": "d",
                "num_images": 10,
                "num_texts": 10,
                "metrics": metrics,
                "top_k": 5,
                "reranked_metrics": {"image_retrieval_recall@1": reranked},
            }
        )
    )


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    """Three seeds of InfoNCE (R@1 .4/.5/.6 -> 50.0 ± 10.0) and one SigLIP run."""
    monkeypatch.chdir(tmp_path)
    for seed, (t2i, loss) in enumerate([(0.4, 1.0), (0.5, 2.0), (0.6, 3.0)]):
        write_results(tmp_path / f"runs/infonce/seed{seed}/results.json", t2i, 0.7, 0.6, loss, acc1=0.9)
    write_results(tmp_path / "runs/siglip/results.json", 0.45, 0.8, 0.65, 1.0)
    (tmp_path / "table.yaml").write_text(SPEC)
    return tmp_path


def test_markdown_from_spec(results_dir, capsys):
    assert main(["table", "table.yaml"]) == 0
    assert capsys.readouterr().out == EXPECTED_MARKDOWN


def test_latex_from_spec_to_file(results_dir):
    assert main(["table", "table.yaml", "--format", "latex", "--output", "out/table.tex"]) == 0
    assert (results_dir / "out/table.tex").read_text() == EXPECTED_LATEX


def test_files_on_command_line_group_seeds_into_rows(results_dir, capsys):
    files = sorted(str(p) for p in Path("runs").glob("**/results.json"))
    assert (
        main(
            [
                "table",
                *files,
                "--metrics",
                "image_retrieval_recall@1",
                "reranked_metrics.image_retrieval_recall@1",
                "--decimals",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "|  | T→I R@1 | T→I R@1 (reranked) |"
    assert out[2] == "| infonce | **50.00 ± 10.00** | 60.00 ± 0.00 |"
    assert out[3] == "| siglip | 45.00 | **65.00** |"


def test_default_columns_keep_acc1_when_some_files_have_it(results_dir, capsys):
    infonce = sorted(str(p) for p in Path("runs/infonce").glob("*/results.json"))
    assert main(["table", *infonce]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "|  | T→I R@1 | T→I R@5 | I→T R@1 | I→T R@5 | acc1 |"
    assert main(["table", *infonce, "runs/siglip/results.json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| acc1 |")  # not dropped because siglip has no acc1
    # acc1 has one value: nothing to compare, no bold; R@1 has two
    assert lines[2].endswith("| 90.0 ± 0.0 |") and lines[3].endswith("| – |")
    assert lines[2].startswith("| infonce | **50.0 ± 10.0** |")


def write_eval_results(
    path: Path, data: str, task: str, seed: int, acc1: float | None, loss: str = "infonce"
):
    """A results file as `mmret eval` writes it (data, task, config of the checkpoint and the evaluation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {m: 0.5 + seed / 10 for m in ("image_retrieval_recall@1", "image_retrieval_recall@5")}
    metrics |= {m: 0.4 for m in ("text_retrieval_recall@1", "text_retrieval_recall@5")}
    if acc1 is not None:
        metrics["acc1"] = acc1
    hyper = {"model": "test-vit-tiny", "loss": loss, "lr": 5e-4}
    evaluation = {"task": "auto", "split": "test", "batch_size": 64 * (seed + 1), "device": "cpu"}
    document = {
        "task": task,
        "model": f"runs/x/seed{seed}/checkpoints/last.ckpt",
        "data": data,
        "num_images": 10,
        "num_texts": 10,
        "metrics": metrics,
        "top_k": None,
        "config": {"model": hyper, "eval": evaluation},
    }
    path.write_text(json.dumps(document))
    return str(path)


def test_digits_and_shapes_results_never_share_a_row(tmp_path, monkeypatch, capsys):
    """Issue 21: a digits zero-shot and a shapes retrieval result from one folder made one row "mean ± std over
    2 seeds" and dropped the acc1 column."""
    monkeypatch.chdir(tmp_path)
    digits = write_eval_results(Path("results/digits.json"), "data/digits/test", "zeroshot", 0, acc1=0.9)
    shapes = write_eval_results(Path("results/shapes.json"), "data/shapes/test", "retrieval", 1, acc1=None)
    assert main(["table", digits, shapes]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "|  | T→I R@1 | T→I R@5 | I→T R@1 | I→T R@5 | acc1 |"
    # one row per data set: nothing to compare, so nothing is bold
    assert lines[2].startswith("| digits | 50.0 |") and lines[2].endswith("| 90.0 |")
    assert lines[3].startswith("| shapes | 60.0 |") and lines[3].endswith("| – |")
    assert len(lines) == 4 and "seeds" not in "".join(lines)  # two rows of one run each, no seed note
    assert "**" not in "".join(lines)
    # the same two results as two "seeds" of one run directory: still two rows, named by what differs
    digits = write_eval_results(
        Path("runs/x/seed0/results.json"), "data/digits/test", "zeroshot", 0, acc1=0.9
    )
    shapes = write_eval_results(
        Path("runs/x/seed1/results.json"), "data/shapes/test", "retrieval", 1, acc1=None
    )
    assert main(["table", digits, shapes, "--metrics", "image_retrieval_recall@1"]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| x [data/digits/test, zeroshot] | 50.0 |",
        "| x [data/shapes/test, retrieval] | 60.0 |",
    ]


def test_runs_that_differ_by_more_than_the_seed_are_not_averaged(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    files = [
        write_eval_results(
            Path(f"runs/x/seed{seed}/results.json"), "data/digits/test", "zeroshot", seed, 0.9, loss
        )
        for seed, loss in [(0, "infonce"), (1, "infonce"), (2, "siglip")]
    ]
    assert main(["table", *files, "--metrics", "image_retrieval_recall@1"]) == 0
    out = capsys.readouterr().out.splitlines()
    # seeds 0 and 1 differ in seed and eval batch size only: averaged; the siglip run is its own row
    assert out[2:4] == ["| x [loss=infonce] | 55.0 ± 7.1 |", "| x [loss=siglip] | **70.0** |"]


def test_group_by_names_the_grouping(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    files = [
        write_eval_results(
            Path(f"runs/{data}/seed{seed}/results.json"), f"data/{data}/test", "retrieval", seed, None
        )
        for data in ("digits", "shapes")
        for seed in (0, 1)
    ]
    assert main(["table", *files, "--metrics", "image_retrieval_recall@1"]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| digits | 55.0 ± 7.1 |",  # different data sets: not compared
        "| shapes | 55.0 ± 7.1 |",
        "",
        "_mean ± std over 2 seeds._",
    ]
    assert (
        main(["table", *files, "--metrics", "image_retrieval_recall@1", "--group-by", "task", "model"]) == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[2:] == ["| retrieval | 55.0 ± 5.8 |", "", "_mean ± std over 4 runs._"]  # one row: no bold


def test_a_spec_row_mixing_data_sets_is_refused_unless_it_names_the_grouping(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_eval_results(Path("runs/m/digits/results.json"), "data/digits/test", "retrieval", 0, None)
    write_eval_results(Path("runs/m/shapes/results.json"), "data/shapes/test", "retrieval", 1, None)
    row = '{name: m, results: "runs/m/*/results.json"'
    Path("t.yaml").write_text(f"columns: [image_retrieval_recall@1]\nrows: [{row}}}]\n")
    assert main(["table", "t.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "row 'm' mixes data sets (data/digits/test and data/shapes/test)" in err and "average_over" in err
    Path("t.yaml").write_text(f"columns: [image_retrieval_recall@1]\nrows: [{row}, average_over: [data]}}]\n")
    assert main(["table", "t.yaml"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "| m | 55.0 ± 7.1 |"


def test_ties_after_rounding_are_all_bold(results_dir, capsys):
    write_results(results_dir / "runs/tie/results.json", 0.50004, 0.1, 0.1, 9.0)
    assert (
        main(
            [
                "table",
                "runs/tie/results.json",
                "runs/infonce/seed1/results.json",
                "--metrics",
                "image_retrieval_recall@1",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].endswith("| **50.0** |") and lines[3].endswith("| **50.0** |")


def test_a_row_can_read_the_reranked_metrics_of_the_same_files(results_dir, capsys):
    (results_dir / "rerank.yaml").write_text(
        "columns: [{name: R@1, metric: image_retrieval_recall@1}]\n"
        "rows:\n"
        "  - {name: dual, results: runs/siglip/results.json}\n"
        "  - {name: + rerank, results: runs/siglip/results.json, source: reranked_metrics}\n"
    )
    assert main(["table", "rerank.yaml"]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == ["| dual | 45.0 |", "| + rerank | **65.0** |"]


def test_bold_is_the_best_per_data_set_not_per_column(tmp_path, monkeypatch, capsys):
    """Issue 20: one bold number per column across digits and shapes compared numbers of different data sets."""
    monkeypatch.chdir(tmp_path)
    files = [
        write_eval_results(Path(f"runs/{data}_{loss}/results.json"), f"data/{data}/test", "retrieval", seed, None, loss)
        for data, loss, seed in [("digits", "infonce", 0), ("digits", "siglip", 1), ("shapes", "infonce", 2),
                                 ("shapes", "siglip", 0)]
    ]  # fmt: skip
    assert main(["table", *files, "--metrics", "image_retrieval_recall@1", "text_retrieval_recall@1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == [
        "| digits_infonce | 50.0 | **40.0** |",
        "| digits_siglip | **60.0** | **40.0** |",  # the best on digits, though shapes_infonce has more
        "| shapes_infonce | **70.0** | **40.0** |",
        "| shapes_siglip | 50.0 | **40.0** |",
        "",
        "_best per data set in bold._",
    ]
    assert main(["table", *files, "--metrics", "image_retrieval_recall@1", "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    assert r"\caption{(best per data set in bold)}" in latex
    assert latex.count(r"\textbf{") == 2


def test_a_single_row_is_never_bold(results_dir, capsys):
    assert main(["table", "runs/siglip/results.json"]) == 0
    assert "**" not in capsys.readouterr().out
    infonce = sorted(str(p) for p in Path("runs/infonce").glob("*/results.json"))
    assert main(["table", *infonce, "--format", "latex"]) == 0  # one row of three seeds
    latex = capsys.readouterr().out
    assert r"\textbf" not in latex and "bold" not in latex
    assert r"\caption{(mean $\pm$ std over 3 seeds)}" in latex
    (results_dir / "one.yaml").write_text(
        "columns: [image_retrieval_recall@1]\nrows: [{results: runs/siglip/results.json}]\n"
    )
    assert main(["table", "one.yaml"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "| row 1 | 45.0 |"


def write_first_stage_only(path: Path, t2i: float) -> str:
    """A results file of `mmret eval` without --reranker: no reranked_metrics, top_k null."""
    write_results(path, t2i, 0.5, 0.0, 1.0)
    document = json.loads(path.read_text())
    del document["reranked_metrics"]
    path.write_text(json.dumps({**document, "top_k": None}))
    return str(path)


def test_first_stage_and_reranked_results_mix_with_dashes(results_dir, capsys):
    first_only = write_first_stage_only(Path("runs/plain/results.json"), 0.55)
    argv = ["table", "runs/siglip/results.json", first_only]
    columns = ["--metrics", "image_retrieval_recall@1", "reranked_metrics.image_retrieval_recall@1"]
    assert main([*argv, *columns]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "|  | T→I R@1 | T→I R@1 (reranked) |",
        "| --- | ---: | ---: |",
        "| siglip | 45.0 | 65.0 |",  # the reranked column has one value: no bold
        "| plain | **55.0** | – |",
    ]
    assert main([*argv]) == 0  # default columns: first-stage metrics of both
    assert "–" not in capsys.readouterr().out
    # in a spec: a reranked row of first-stage-only files shows dashes
    (results_dir / "mixed.yaml").write_text(
        "columns: [{name: R@1, metric: image_retrieval_recall@1}]\n"
        "rows:\n"
        f"  - {{name: plain, results: {first_only}}}\n"
        f"  - {{name: plain reranked, results: {first_only}, source: reranked_metrics}}\n"
        "  - {name: siglip reranked, results: runs/siglip/results.json, source: reranked_metrics}\n"
    )
    assert main(["table", "mixed.yaml"]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| plain | 55.0 |",
        "| plain reranked | – |",
        "| siglip reranked | **65.0** |",
    ]


def test_a_reranked_column_needs_some_reranked_results_and_seeds_evaluated_alike(results_dir, capsys):
    first_only = write_first_stage_only(Path("runs/plain/results.json"), 0.55)
    assert main(["table", first_only, "--metrics", "reranked_metrics.image_retrieval_recall@1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no results file has reranked_metrics['image_retrieval_recall@1']" in err
    # a seed evaluated without the reranker is another run (top_k null), not a seed of the reranked one
    write_first_stage_only(Path("runs/infonce/seed1/results.json"), 0.5)
    seeds = sorted(str(p) for p in Path("runs/infonce").glob("*/results.json"))
    assert main(["table", *seeds, "--metrics", "reranked_metrics.image_retrieval_recall@1"]) == 0
    assert capsys.readouterr().out.splitlines()[2:4] == [
        "| infonce [top_k=5] | 60.0 ± 0.0 |",
        "| infonce [top_k=null] | – |",
    ]
    (results_dir / "half.yaml").write_text(
        "columns: [{metric: image_retrieval_recall@1, source: reranked_metrics}]\n"
        "rows: [{name: infonce, results: runs/infonce/seed*/results.json, average_over: [model]}]\n"
    )
    assert main(["table", "half.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs/infonce/seed1/results.json has no reranked_metrics" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["table", "missing.yaml"], "table spec missing.yaml does not exist"),
        (["table", "source.yaml"], "row 'x' has source 'first_stage'; expected one of"),
        (["table", "runs/nothing.json"], "results file runs/nothing.json does not exist"),
        (["table", "runs/siglip/results.json", "--metrics", "acc1"], "has no metrics['acc1']"),
        (["table", "bad.yaml"], "row 'x': no results file matches runs/none/*.json"),
        (
            ["table", "runs/siglip/results.json", "--group-by", "dataset"],
            "--group-by dataset: expected some of",
        ),
        (["table", "bad.yaml", "--group-by", "data"], "--group-by is for results files given directly"),
    ],
)
def test_bad_input_is_one_line_exit_2(results_dir, capsys, argv, message):
    (results_dir / "bad.yaml").write_text("columns: [acc1]\nrows: [{name: x, results: runs/none/*.json}]\n")
    (results_dir / "source.yaml").write_text(
        "columns: [acc1]\nrows: [{name: x, results: runs/siglip/results.json, source: first_stage}]\n"
    )
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (results_dir / "out").exists()


@pytest.mark.parametrize(
    "spec_path", sorted((REPO / "experiments" / "tables").glob("*.yaml")), ids=lambda path: path.stem
)
def test_shipped_table_spec_renders_from_its_runs(spec_path, tmp_path, monkeypatch, capsys):
    """Results files where the spec's sweep (experiments/sweeps/<same name>.yaml) or its rows put them: every
    sweep point lands in exactly one row, and the table renders in both formats."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").symlink_to(REPO / "experiments")
    raw = yaml.safe_load(spec_path.read_text())
    metrics = [column["metric"] for column in raw["columns"]]

    def write(path: Path, value: float) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        values = {metric: value for metric in metrics}
        path.write_text(json.dumps({"task": "retrieval", "metrics": values, "reranked_metrics": values}))
        return path

    sweep_path = Path("experiments/sweeps") / spec_path.name
    if sweep_path.is_file():
        points = load_sweep(sweep_path).points()
        written = {write(p.run_dir / "results.json", i / len(points)) for i, p in enumerate(points)}
    else:  # one file per glob of each row (seed0 for seed*)
        patterns = [pattern for row in raw["rows"] for pattern in (row["results"] if isinstance(row["results"], list) else [row["results"]])]  # fmt: skip
        written = {write(Path(pattern.replace("*", "0")), 0.5) for pattern in patterns}
    spec = load_table_spec(Path("experiments/tables") / spec_path.name)
    used = [file for row in spec.rows for file in row.files]
    assert sorted(map(str, set(used))) == sorted(map(str, written))
    if sweep_path.is_file():
        assert len(used) == len(written), "a sweep point is in two rows"
    for fmt in ("markdown", "latex"):
        assert main(["table", str(Path("experiments/tables") / spec_path.name), "--format", fmt]) == 0
        out = capsys.readouterr().out
        assert all(row.name.split(",")[0] in out for row in spec.rows)
