"""The bad-input matrix over every mmret command (issue 21): each command x missing input, input of the wrong
kind, unreadable or corrupt input, out-of-range numbers, output under something that cannot hold it, output that
is a folder where a file is expected. Every case must end the way the README promises: exit code 2, one line on
stderr, no traceback, and nothing written where the output would have gone.

The commands run in this process through `mmret.cli.main` (argparse's own refusals arrive as SystemExit(2)), except
`mmret serve`, which runs as a subprocess that must exit 2 quickly. An unwritable output location is a path under
a regular file (`blocker/out`): chmod 0o555 does not stop root, a file as parent stops everyone.

.venv/bin/pytest tests/test_fault_matrix.py -q
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from mmret.cli import main

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


# ---- inputs shared by every case: built once, outside each case's tmp_path -----------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, digits_root, trained_checkpoint) -> dict[str, str]:
    """Placeholder -> path: real data and checkpoints, and files of the wrong kind or corrupt."""
    from PIL import Image

    root = tmp_path_factory.mktemp("fault_inputs")
    text = root / "notes.txt"
    text.write_text("not what was asked for\n")
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(trained_checkpoint.read_bytes()[:4096])
    reranker = root / "reranker.ckpt"  # what a command checks first: the checkpoint's kind
    torch.save({"mmret": {"kind": "cross_encoder", "model": "test-vit-micro"}, "state_dict": {}}, reranker)
    unfit = root / "unfit.ckpt"  # a dual-encoder checkpoint whose weights lost a tensor
    checkpoint = torch.load(trained_checkpoint, map_location="cpu", weights_only=False)
    checkpoint["state_dict"].pop(next(iter(checkpoint["state_dict"])))
    torch.save(checkpoint, unfit)
    imageless = root / "imageless.tar"  # a real tar without a single image
    with tarfile.open(imageless, "w") as tar:
        member = tarfile.TarInfo("0000.txt")
        member.size = 5
        tar.addfile(member, io.BytesIO(b"a cat"))
    images = root / "images"
    images.mkdir()
    rows = []
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(images / f"{i}.png")
        rows.append(json.dumps({"image": str(images / f"{i}.png"), "caption": f"image {i}"}))
    pairs = root / "pairs.jsonl"
    pairs.write_text("\n".join(rows) + "\n")
    broken_pairs = root / "broken.jsonl"
    broken_pairs.write_text('{"image": "a.png", "caption": \n')
    broken_yaml = root / "broken.yaml"
    broken_yaml.write_text("model: [unclosed\n  key: {\n")
    results = {}
    for name, value in [("null", None), ("dict", {"a": 1}), ("string", "high")]:
        path = root / f"results_{name}.json"
        document = {"task": "retrieval", "model": "m.ckpt", "data": "data/digits/test", "num_images": 10,
                    "num_texts": 10, "metrics": {"image_retrieval_recall@1": value}, "top_k": None,
                    "config": {"model": {}, "eval": {}}}  # fmt: skip
        path.write_text(json.dumps(document))
        results[f"results_{name}"] = str(path)
    good_results = root / "results_good.json"
    good_results.write_text(json.dumps({**json.loads(Path(results["results_null"]).read_text()),
                                        "metrics": {"image_retrieval_recall@1": 0.5}}))  # fmt: skip
    truncated_json = root / "results_truncated.json"
    truncated_json.write_text(good_results.read_text()[:40])
    sweep_text = (REPO / "experiments/sweeps/digits_loss_batch.yaml").read_text()
    sweep_text = sweep_text.replace(
        "experiment: experiments/digits_clip.yaml", f"experiment: {REPO / 'experiments/digits_clip.yaml'}"
    )
    misspelt = root / "misspelt_sweep.yaml"
    misspelt.write_text(sweep_text.replace("\n  model.init_args.loss: ", "\n  model.init_args.lossy: "))
    not_mapping = root / "list_sweep.yaml"
    not_mapping.write_text("- just\n- a list\n")
    index = root / "digits.index"
    assert main(["index", "--model", str(trained_checkpoint), "--data", str(digits_root / "test"),
                 "--output", str(index), "--device", "cpu"]) == 0  # fmt: skip
    return {
        "ckpt": str(trained_checkpoint),
        "reranker": str(reranker),
        "unfit": str(unfit),
        "imageless": str(imageless),
        "truncated": str(truncated),
        "text": str(text),
        "data": str(digits_root),
        "train": str(digits_root / "train"),
        "test": str(digits_root / "test"),
        "pairs": str(pairs),
        "broken_pairs": str(broken_pairs),
        "broken_yaml": str(broken_yaml),
        "good_results": str(good_results),
        "truncated_json": str(truncated_json),
        "misspelt_sweep": str(misspelt),
        "list_sweep": str(not_mapping),
        "index": str(index),
        **results,
    }


# ---- the matrix: (argv with placeholders, a word the one line must carry) --------------------------------------
# {out}: where the output would go (tmp_path/out...), {blocked}: under a regular file, {dir}: an existing folder,
# {file}: an existing regular file, {missing}: a path that does not exist.
FIT = ["fit", "--model", "mmret.training.DualEncoder", "--model.model", "test-vit-micro",
       "--data", "mmret.data.datamodule.RetrievalDataModule", "--data.num_workers", "0",
       "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"]  # fmt: skip
RERANKER_FIT = ["fit", "--model", "mmret.training.CrossEncoder", "--model.fusion_width", "32",
                "--data", "mmret.data.datamodule.RetrievalDataModule", "--data.num_workers", "0",
                "--data.train", "{train}", "--trainer.accelerator", "cpu", "--trainer.max_steps", "1",
                "--run_dir", "{out}/run"]  # fmt: skip
EVAL = ["eval", "--device", "cpu", "--num-workers", "0"]
MINE = ["mine", "--device", "cpu", "--num-workers", "0"]
INDEX = ["index", "--device", "cpu"]
SEARCH = ["search", "--device", "cpu"]

CASES: dict[str, tuple[list[str], str]] = {
    # shards
    "shards-missing-src": (["shards", "{missing}", "--output", "{out}/s", "--image-size", "16"], "missing"),
    "shards-text-src": (["shards", "{text}", "--output", "{out}/s", "--image-size", "16"], "notes.txt"),
    "shards-corrupt-jsonl": (
        ["shards", "{broken_pairs}", "--output", "{out}/s", "--image-size", "16"],
        "broken",
    ),
    "shards-image-size-0": (["shards", "{pairs}", "--output", "{out}/s", "--image-size", "0"], "image-size"),
    "shards-image-size-neg": (
        ["shards", "{pairs}", "--output", "{out}/s", "--image-size", "-4"],
        "image-size",
    ),
    "shards-shard-size-0": (
        ["shards", "{pairs}", "--output", "{out}/s", "--image-size", "16", "--shard-size", "0"],
        "shard-size",
    ),  # fmt: skip
    "shards-blocked-output": (
        ["shards", "{pairs}", "--output", "{blocked}", "--image-size", "16"],
        "not a writable",
    ),
    "shards-output-is-file": (
        ["shards", "{pairs}", "--output", "{file}", "--image-size", "16"],
        "is not a folder",
    ),
    # datasets
    "datasets-unknown-name": (["datasets", "mnist", "--output", "{out}/d"], "mnist"),
    "datasets-image-size-0": (
        ["datasets", "digits", "--output", "{out}/d", "--image-size", "0"],
        "image-size",
    ),
    "datasets-image-size-neg": (
        ["datasets", "digits", "--output", "{out}/d", "--image-size", "-1"],
        "image-size",
    ),
    "datasets-blocked-output": (["datasets", "digits", "--output", "{blocked}"], "not a writable"),
    "datasets-output-is-file": (["datasets", "digits", "--output", "{file}"], "is not a folder"),
    # fit
    "fit-missing-train": ([*FIT, "--data.train", "{missing}", "--run_dir", "{out}/run"], "missing"),
    "fit-text-train": ([*FIT, "--data.train", "{text}", "--run_dir", "{out}/run"], "notes.txt"),
    "fit-batch-size-0": (
        [*FIT, "--data.train", "{train}", "--data.batch_size", "0", "--run_dir", "{out}/run"],
        "batch_size",
    ),  # fmt: skip
    "fit-batch-size-neg": (
        [*FIT, "--data.train", "{train}", "--data.batch_size", "-2", "--run_dir", "{out}/run"],
        "batch_size",
    ),  # fmt: skip
    "fit-corrupt-config": (["fit", "-c", "{broken_yaml}", "--run_dir", "{out}/run"], "parsing config"),
    "fit-missing-config": (["fit", "-c", "{missing}", "--run_dir", "{out}/run"], "missing"),
    "fit-blocked-run-dir": (
        [*FIT, "--data.train", "{train}", "--run_dir", "{blocked}"],
        "cannot create run directory",
    ),
    "fit-reranker-on-text": ([*RERANKER_FIT, "--model.dual_encoder", "{text}"], "notes.txt"),
    "fit-reranker-on-reranker": ([*RERANKER_FIT, "--model.dual_encoder", "{reranker}"], "cross_encoder"),
    "fit-reranker-on-truncated": ([*RERANKER_FIT, "--model.dual_encoder", "{truncated}"], "truncated.ckpt"),
    # eval
    "eval-missing-model": (
        [*EVAL, "--model", "{missing}", "--data", "{data}", "--output", "{out}/r.json"],
        "missing",
    ),  # fmt: skip
    "eval-text-model": (
        [*EVAL, "--model", "{text}", "--data", "{data}", "--output", "{out}/r.json"],
        "notes.txt",
    ),
    "eval-truncated-model": (
        [*EVAL, "--model", "{truncated}", "--data", "{data}", "--output", "{out}/r.json"],
        "truncated.ckpt",
    ),  # fmt: skip
    "eval-reranker-as-model": (
        [*EVAL, "--model", "{reranker}", "--data", "{data}", "--output", "{out}/r.json"],
        "cross_encoder",
    ),  # fmt: skip
    "eval-dual-as-reranker": (
        [*EVAL, "--model", "{ckpt}", "--reranker", "{ckpt}", "--data", "{data}", "--output", "{out}/r.json"],
        "dual_encoder",
    ),  # fmt: skip
    "eval-unfit-model": (
        [*EVAL, "--model", "{unfit}", "--data", "{data}", "--output", "{out}/r.json"],
        "do not fit",
    ),  # fmt: skip
    "eval-missing-data": (
        [*EVAL, "--model", "{ckpt}", "--data", "{missing}", "--output", "{out}/r.json"],
        "missing",
    ),  # fmt: skip
    "eval-text-data": (
        [*EVAL, "--model", "{ckpt}", "--data", "{text}", "--output", "{out}/r.json"],
        "notes.txt",
    ),
    "eval-batch-size-0": (
        [*EVAL, "--model", "{ckpt}", "--data", "{data}", "--output", "{out}/r.json", "--batch-size", "0"],
        "batch-size",
    ),  # fmt: skip
    "eval-top-k-0": (
        [*EVAL, "--model", "{ckpt}", "--data", "{data}", "--output", "{out}/r.json", "--top-k", "0"],
        "top-k",
    ),  # fmt: skip
    "eval-top-k-neg": (
        [*EVAL, "--model", "{ckpt}", "--data", "{data}", "--output", "{out}/r.json", "--top-k", "-3"],
        "top-k",
    ),  # fmt: skip
    "eval-dim-0": (
        [*EVAL, "--model", "{ckpt}", "--data", "{data}", "--output", "{out}/r.json", "--dim", "0"],
        "--dim",
    ),  # fmt: skip
    "eval-dim-wider-than-model": (
        [*EVAL, "--model", "{ckpt}", "--data", "{data}", "--output", "{out}/r.json", "--dim", "33"],
        "[1, 32]",
    ),  # fmt: skip
    "eval-blocked-output": (
        [*EVAL, "--model", "{ckpt}", "--data", "{data}", "--output", "{blocked}"],
        "not a writable",
    ),
    "eval-output-is-dir": (
        [*EVAL, "--model", "{ckpt}", "--data", "{data}", "--output", "{dir}"],
        "is a directory",
    ),
    # mine
    "mine-missing-model": (
        [*MINE, "--model", "{missing}", "--data", "{data}", "--output", "{out}/m.jsonl"],
        "missing",
    ),  # fmt: skip
    "mine-truncated-model": (
        [*MINE, "--model", "{truncated}", "--data", "{data}", "--output", "{out}/m.jsonl"],
        "truncated.ckpt",
    ),  # fmt: skip
    "mine-reranker-as-model": (
        [*MINE, "--model", "{reranker}", "--data", "{data}", "--output", "{out}/m.jsonl"],
        "cross_encoder",
    ),  # fmt: skip
    "mine-missing-data": (
        [*MINE, "--model", "{ckpt}", "--data", "{missing}", "--output", "{out}/m.jsonl"],
        "missing",
    ),  # fmt: skip
    "mine-num-negatives-0": (
        [*MINE, "--model", "{ckpt}", "--data", "{data}", "--output", "{out}/m.jsonl", "--num-negatives", "0"],
        "num-negatives",
    ),  # fmt: skip
    "mine-batch-size-neg": (
        [*MINE, "--model", "{ckpt}", "--data", "{data}", "--output", "{out}/m.jsonl", "--batch-size", "-1"],
        "batch-size",
    ),  # fmt: skip
    "mine-blocked-output": (
        [*MINE, "--model", "{ckpt}", "--data", "{data}", "--output", "{blocked}"],
        "not a writable",
    ),
    "mine-output-is-dir": (
        [*MINE, "--model", "{ckpt}", "--data", "{data}", "--output", "{dir}"],
        "is a directory",
    ),
    # export
    "export-missing": (["export", "{missing}", "--output", "{out}/e"], "missing"),
    "export-text": (["export", "{text}", "--output", "{out}/e"], "notes.txt"),
    "export-truncated": (["export", "{truncated}", "--output", "{out}/e"], "truncated.ckpt"),
    "export-blocked-output": (["export", "{ckpt}", "--output", "{blocked}"], "not a writable"),
    "export-output-is-file": (["export", "{ckpt}", "--output", "{file}"], "is not a folder"),
    # table
    "table-missing": (["table", "{missing}"], "missing"),
    "table-null-metric": (["table", "{results_null}"], "image_retrieval_recall@1"),
    "table-dict-metric": (["table", "{results_dict}"], "image_retrieval_recall@1"),
    "table-string-metric": (["table", "{results_string}"], "image_retrieval_recall@1"),
    "table-truncated-json": (["table", "{truncated_json}"], "results_truncated.json"),
    "table-corrupt-yaml-spec": (["table", "{broken_yaml}"], "broken.yaml"),
    "table-decimals-neg": (["table", "{good_results}", "--decimals", "-1"], "decimals"),
    "table-blocked-output": (["table", "{good_results}", "--output", "{blocked}"], "not a writable"),
    "table-output-is-dir": (["table", "{good_results}", "--output", "{dir}"], "is a directory"),
    # sweep --dry-run
    "sweep-missing": (["sweep", "{missing}", "--dry-run"], "missing"),
    "sweep-corrupt-yaml": (["sweep", "{broken_yaml}", "--dry-run"], "broken.yaml"),
    "sweep-not-a-mapping": (["sweep", "{list_sweep}", "--dry-run"], "list_sweep.yaml"),
    "sweep-misspelt-key": (["sweep", "{misspelt_sweep}", "--dry-run"], "lossy"),
    # index
    "index-missing-model": (
        [*INDEX, "--model", "{missing}", "--data", "{test}", "--output", "{out}/i"],
        "missing",
    ),
    "index-truncated-model": (
        [*INDEX, "--model", "{truncated}", "--data", "{test}", "--output", "{out}/i"],
        "truncated.ckpt",
    ),  # fmt: skip
    "index-reranker-as-model": (
        [*INDEX, "--model", "{reranker}", "--data", "{test}", "--output", "{out}/i"],
        "cross_encoder",
    ),  # fmt: skip
    "index-missing-data": (
        [*INDEX, "--model", "{ckpt}", "--data", "{missing}", "--output", "{out}/i"],
        "missing",
    ),
    "index-text-data": (
        [*INDEX, "--model", "{ckpt}", "--data", "{text}", "--output", "{out}/i"],
        "notes.txt",
    ),
    "index-imageless-data": (
        [*INDEX, "--model", "{ckpt}", "--data", "{imageless}", "--output", "{out}/i"],
        "no readable image",
    ),
    "index-batch-size-0": (
        [*INDEX, "--model", "{ckpt}", "--data", "{test}", "--output", "{out}/i", "--batch-size", "0"],
        "batch-size",
    ),  # fmt: skip
    "index-blocked-output": (
        [*INDEX, "--model", "{ckpt}", "--data", "{test}", "--output", "{blocked}"],
        "not a writable",
    ),
    "index-output-is-file": (
        [*INDEX, "--model", "{ckpt}", "--data", "{test}", "--output", "{file}"],
        "is a file",
    ),
    # search
    "search-missing-index": ([*SEARCH, "{missing}", "a digit"], "missing"),
    "search-text-index": ([*SEARCH, "{text}", "a digit"], "notes.txt"),
    "search-shards-as-index": ([*SEARCH, "{test}", "a digit"], "test"),
    "search-k-0": ([*SEARCH, "{index}", "a digit", "--k", "0"], "k is 0"),
    "search-k-neg": ([*SEARCH, "{index}", "a digit", "--k", "-2"], "k"),
    "search-dual-as-reranker": ([*SEARCH, "{index}", "a digit", "--reranker", "{ckpt}"], "dual_encoder"),
    "search-reranker-weights-unfit": (
        [*SEARCH, "{index}", "a digit", "--reranker", "{reranker}"],
        "do not fit",
    ),
    "index-dim-neg": (
        [*INDEX, "--model", "{ckpt}", "--data", "{test}", "--output", "{out}/i", "--dim", "-2"],
        "--dim",
    ),  # fmt: skip
    "index-dim-wider-than-model": (
        [*INDEX, "--model", "{ckpt}", "--data", "{test}", "--output", "{out}/i", "--dim", "64"],
        "[1, 32]",
    ),  # fmt: skip
    "search-dim-other-than-index": ([*SEARCH, "{index}", "a digit", "--dim", "16"], "32-d"),
    "search-blocked-sheet": ([*SEARCH, "{index}", "a digit", "--sheet", "{blocked}.png"], "not a writable"),
    "search-sheet-is-dir": ([*SEARCH, "{index}", "a digit", "--sheet", "{dir}"], "is a directory"),
}

# `mmret serve` as a real process: it must refuse before it starts serving
SERVE_CASES: dict[str, tuple[list[str], str]] = {
    "serve-missing-index": (["serve", "{missing}"], "missing"),
    "serve-text-index": (["serve", "{text}"], "notes.txt"),
    "serve-port-out-of-range": (["serve", "{index}", "--port", "70000"], "--port"),
    "serve-dual-as-reranker": (["serve", "{index}", "--reranker", "{ckpt}"], "dual_encoder"),
    "serve-dim-other-than-index": (["serve", "{index}", "--dim", "16"], "32-d"),
}


def snapshot(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def places(tmp_path: Path) -> dict[str, str]:
    """The output locations of one case, all under tmp_path (whose contents are snapshot before and after)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file: nothing can be created under it\n")
    existing_dir = tmp_path / "existing_dir"
    existing_dir.mkdir()
    existing_file = tmp_path / "existing_file"
    existing_file.write_text("a file where a folder is expected\n")
    out = tmp_path / "out"
    out.mkdir()
    return {"out": str(out), "blocked": str(blocker / "out"), "dir": str(existing_dir),
            "file": str(existing_file), "missing": str(tmp_path / "missing")}  # fmt: skip


def check_refusal(code: int, err: str, word: str, before: set[str], after: set[str]) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}:\n{err[-3000:]}"
    assert not any("Traceback" in line for line in lines), err[-3000:]
    # the message is one line (argparse's own refusals put the usage before it)
    messages = [line for line in lines if not line.startswith(("usage:", " "))]
    assert len(messages) == 1, err[-3000:]
    assert word in messages[0], err[-3000:]
    assert after == before, f"left behind: {sorted(after - before)}"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, inputs, tmp_path, capsys):
    argv_template, word = CASES[case]
    names = {**inputs, **places(tmp_path)}
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main([part.format(**names) for part in argv_template])
    except SystemExit as exit_:  # argparse's refusals (type checks, missing options)
        code = exit_.code
    check_refusal(code, capsys.readouterr().err, word, before, snapshot(tmp_path))


@pytest.mark.parametrize("case", list(SERVE_CASES))
def test_serve_refuses_bad_input_as_a_process(case, inputs, tmp_path):
    argv_template, word = SERVE_CASES[case]
    names = {**inputs, **places(tmp_path)}
    before = snapshot(tmp_path)
    argv = [part.format(**names) for part in argv_template]
    if "--port" not in argv:
        with socket.socket() as probe:  # a free port: a busy default would be another refusal than the case's
            probe.bind(("127.0.0.1", 0))
            argv += ["--port", str(probe.getsockname()[1])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, "-m", "mmret", *argv, "--device", "cpu"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    check_refusal(process.returncode, process.stderr, word, before, snapshot(tmp_path))
