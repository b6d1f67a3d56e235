"""`mmret table` against a hand-made set of results files: exact markdown and LaTeX, seeds, bold, errors; every
shipped table spec renders from the runs of its sweep.

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


def test_default_columns_add_acc1_only_when_every_file_has_it(results_dir, capsys):
    infonce = sorted(str(p) for p in Path("runs/infonce").glob("*/results.json"))
    assert main(["table", *infonce]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "|  | T→I R@1 | T→I R@5 | I→T R@1 | I→T R@5 | acc1 |"
    assert main(["table", *infonce, "runs/siglip/results.json"]) == 0
    assert "acc1" not in capsys.readouterr().out.splitlines()[0]


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["table", "missing.yaml"], "table spec missing.yaml does not exist"),
        (["table", "source.yaml"], "row 'x' has source 'first_stage'; expected one of"),
        (["table", "runs/nothing.json"], "results file runs/nothing.json does not exist"),
        (["table", "runs/siglip/results.json", "--metrics", "acc1"], "has no metrics['acc1']"),
        (["table", "bad.yaml"], "row 'x': no results file matches runs/none/*.json"),
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
