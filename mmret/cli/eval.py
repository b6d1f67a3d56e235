"""`mmret eval`: retrieval and zero-shot metrics of a trained dual encoder on a shard set, with pictures.

    mmret eval --model runs/digits_clip/last.ckpt --data data/digits --output results/digits.json
    mmret eval --model CKPT --data data/shapes/test --task retrieval --device cuda --batch-size 256 --output r.json
    mmret eval --model CKPT --reranker RERANKER_CKPT --top-k 10 --data data/shapes --output reranked.json
    mmret eval --model CKPT --data data/shapes --protocol clip_benchmark --output shapes_clip_benchmark.json
    mmret eval --task compositional --model CKPT --data data/shapes [--reranker CKPT] --output comp.json
    mmret eval --task compositional --model CKPT --benchmark swap_att.json --image-root val2017 --output s.json
    mmret eval --model CKPT --data data/digits --dim 32 --output digits_dim32.json     # a Matryoshka prefix

What is computed and written (the results JSON, `_examples.png`, `_recall.png`) is `mmret.evaluation.results`;
for `--task compositional` (caption perturbations and twin images, or SugarCrepe / ARO files; the JSON and
`_compositional.png`) it is `mmret.evaluation.compositional`. This module reads the arguments, loads the
checkpoints and prints the headline numbers. `--dim D` evaluates the first D coordinates of every embedding,
re-normalised (`mmret.evaluation.matryoshka`); without it a Matryoshka checkpoint also reports every dim it was
trained at (`dim<d>/<metric>`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmret.cli import add_model_arguments, add_run_arguments
from mmret.errors import UsageError
from mmret.evaluation.metrics import PROTOCOLS
from mmret.evaluation.results import TASKS
from mmret.evaluation.shard_set import SPLITS
from mmret.progress import quiet_progress


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmret eval`."""
    add_model_arguments(parser)
    parser.add_argument(
        "--data",
        default=None,
        help="a shard directory, or a dataset root holding train/val/test (see --split); required unless "
        "--task compositional --benchmark FILE",
    )
    parser.add_argument(
        "--output", required=True, help="results JSON to write (replaced if it exists); PNGs go beside it"
    )
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="auto",
        help="retrieval: image<->text metrics; zeroshot: also classification accuracy (needs class_names in "
        "dataset.json); auto: zeroshot when the data has classes; compositional: accuracy of the "
        "true caption over perturbed ones and of the own image over its swap-group twins (SugarCrepe-style) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="mmret",
        help="what the text queries are. mmret: one per unique caption, relevant to every image it was paired "
        "with, ties ranked pessimistically; clip_benchmark: CLIP_benchmark's zero-shot retrieval, one per "
        "caption occurrence relevant to its own image only, recall@K as torch.topk orders the scores (only "
        "recall@K; images read in data order, so --num-workers 0 or 1; no --reranker). Zero-shot accuracy is "
        "the same under both (default: %(default)s)",
    )
    parser.add_argument(
        "--benchmark",
        nargs="+",
        default=None,
        metavar="FILE",
        help="with --task compositional, instead of --data: SugarCrepe JSON files ({id: {filename, caption, "
        "negative_caption}}) or ARO ones ([{image_path, true_caption, false_caption}]), one type per file",
    )
    parser.add_argument(
        "--image-root",
        default=None,
        help="folder of the --benchmark files' relative image paths (default: each file's folder)",
    )
    parser.add_argument(
        "--dim",
        type=int,
        default=None,
        help="evaluate the first DIM coordinates of every embedding, re-normalised (a Matryoshka prefix; 1 .. the "
        "embedding width). Default: the full width, plus every smaller dim a Matryoshka checkpoint was trained "
        "at, reported as dim<d>/<metric>",
    )
    parser.add_argument(
        "--split", choices=SPLITS, default="test", help="split of a dataset root (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="images (and captions) per forward pass (default: %(default)s)",
    )
    add_run_arguments(parser)
    parser.add_argument(
        "--num-workers", type=int, default=1, help="data loader worker processes (default: %(default)s)"
    )
    parser.add_argument(
        "--num-examples",
        type=int,
        default=6,
        help="text queries shown in the examples PNG (default: %(default)s)",
    )
    parser.add_argument(
        "--examples-top-k", type=int, default=8, help="images shown per example query (default: %(default)s)"
    )
    parser.add_argument(
        "--reranker",
        default=None,
        help="a cross-encoder .ckpt (`mmret fit` with mmret.training.CrossEncoder): rescore each "
        "query's top-K and add reranked_metrics and the first-stage recall@K ceiling",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=20,
        help="candidates per query the reranker rescores (default: %(default)s)",
    )
    parser.add_argument(
        "--wandb-summary",
        action="store_true",
        help="also set the results as the summary of the W&B run of the checkpoint's run directory "
        "(RUN_DIR/wandb_run.json, written by `mmret fit --wandb_project P`); offline unless logged in",
    )
    parser.add_argument(
        "--fusion",
        type=float,
        default=0.0,
        help="weight in [0, 1] of the first-stage score fused with the reranker's (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Run `mmret eval` with parsed arguments."""
    from mmret.evaluation.matryoshka import check_dim, prefix_encoder
    from mmret.evaluation.results import EvalOptions, evaluate, open_eval_data
    from mmret.evaluation.shard_set import resolve_data_path, resolve_device
    from mmret.io import check_output_file
    from mmret.training import CrossEncoder, DualEncoder

    output = check_output_file(args.output, expected="a results .json file")
    check_numbers(args)
    check_inputs(args)
    device = resolve_device(args.device)
    if args.benchmark:
        from mmret.evaluation.compositional_benchmarks import read_benchmarks

        triples = read_benchmarks(args.benchmark, args.image_root)  # every file and image checked first
    else:
        data_path = resolve_data_path(args.data, args.split)
        if args.wandb_summary:
            from mmret.training.wandb_tracking import check_results_summary_target

            check_results_summary_target(args.model)  # before any work: a run without W&B is a usage error
        eval_data = open_eval_data(data_path, args.task, args.batch_size, args.num_workers)
    module = DualEncoder.load(args.model, args.pretrained, device)  # UsageError for anything else
    if args.dim is not None:
        check_dim(args.dim, module, f"--model {args.model}")
        module = prefix_encoder(module, args.dim)
    reranker = CrossEncoder.load(args.reranker, device) if args.reranker is not None else None
    options = EvalOptions(
        model=args.model, output=str(output), task=args.task, split=args.split, batch_size=args.batch_size,
        device=str(device), num_workers=args.num_workers, num_examples=args.num_examples,
        examples_top_k=args.examples_top_k, reranker=args.reranker, top_k=args.top_k, fusion=args.fusion,
        protocol=args.protocol, pretrained=args.pretrained, dim=args.dim,
    )  # fmt: skip
    with quiet_progress(args.quiet):
        if args.benchmark:
            from mmret.evaluation.compositional_benchmarks import evaluate_benchmark

            results = evaluate_benchmark(module, args.benchmark, options, args.image_root, reranker, triples)
        elif args.task == "compositional":
            from mmret.evaluation.compositional import evaluate_compositional

            results = evaluate_compositional(module, eval_data, options, reranker=reranker)
        else:
            results = evaluate(module, eval_data, options, reranker=reranker)
    if args.wandb_summary:
        from mmret.training.wandb_tracking import log_results_summary, run_dir_of_checkpoint

        run_id = log_results_summary(run_dir_of_checkpoint(args.model), results)
        print(f"set the results as the summary of W&B run {run_id}")
    print(summary_line(results))
    print(f"wrote {output}, {', '.join(results['pictures'])}")
    return 0


def summary_line(results: dict) -> str:
    """`retrieval: N images, M texts: image_retrieval_recall@1=..., ...` (and the reranked R@1)."""
    metrics, reranked, top_k = results["metrics"], results.get("reranked_metrics"), results.get("top_k")
    if results["task"] == "compositional":
        shown = ("compositional_text_acc", "compositional_image_acc")
        summary = ", ".join(f"{key}={metrics[key]:.4f}" for key in shown if key in metrics)
        if reranked is not None:
            summary += "; reranked: " + ", ".join(
                f"{key}={reranked[key]:.4f}" for key in shown if key in reranked
            )
        return f"compositional: {results['num_images']} images, {results['num_texts']} texts: {summary}"
    shown = [key for key in ("image_retrieval_recall@1", "text_retrieval_recall@1", "acc1") if key in metrics]
    summary = ", ".join(f"{key}={metrics[key]:.4f}" for key in shown)
    if results.get("protocol", "mmret") != "mmret":
        summary += f" ({results['protocol']} protocol)"
    if (results.get("config") or {}).get("eval", {}).get("dim") is not None:
        summary += f" (first {results['dim']} dims)"
    for dim in (results.get("matryoshka_dims") or [])[1:]:
        summary += f"; dim {dim}: " + ", ".join(
            f"{key}={metrics[f'dim{dim}/{key}']:.4f}" for key in shown if f"dim{dim}/{key}" in metrics
        )
    if reranked is not None:
        ceiling = results["first_stage_ceiling"]
        summary += (
            f"; reranked top-{top_k}: image_retrieval_recall@1={reranked['image_retrieval_recall@1']:.4f}"
            f" (ceiling {ceiling[f'image_retrieval_recall@{top_k}']:.4f})"
        )
    return f"{results['task']}: {results['num_images']} images, {results['num_texts']} texts: {summary}"


def check_inputs(args: argparse.Namespace) -> None:
    """--data, or --benchmark with --task compositional: exactly one of them."""
    benchmark = getattr(args, "benchmark", None)
    if benchmark and args.task != "compositional":
        raise UsageError(f"--benchmark needs --task compositional (the task is {args.task}); expected "
                         "--task compositional --benchmark FILE")  # fmt: skip
    if benchmark and args.data is not None:
        raise UsageError("--data and --benchmark are both given; expected one of them (the shard set, or "
                         "SugarCrepe / ARO files)")  # fmt: skip
    if getattr(args, "image_root", None) is not None and not benchmark:
        raise UsageError("--image-root is only read with --benchmark FILE; expected --benchmark too")
    if not benchmark and args.data is None:
        raise UsageError("--data is required (a shard directory or dataset root); or, with --task "
                         "compositional, --benchmark FILE")  # fmt: skip
    if args.task == "compositional" and getattr(args, "wandb_summary", False):
        raise UsageError("--wandb-summary is not available with --task compositional; expected it without")
    check_protocol(args)


def check_protocol(args: argparse.Namespace) -> None:
    """--protocol clip_benchmark: retrieval / zero-shot only, without a reranker, read in data order."""
    protocol = getattr(args, "protocol", "mmret")
    if protocol == "mmret":
        return
    if args.task == "compositional":
        raise UsageError(f"--protocol {protocol} sets the retrieval queries; --task compositional has none "
                         "(expected --protocol mmret, the default, there)")  # fmt: skip
    if getattr(args, "reranker", None) is not None:
        raise UsageError(f"--protocol {protocol} has no reranking stage (CLIP_benchmark ranks by embedding "
                         "only); expected --reranker without it")  # fmt: skip
    if args.num_workers > 1:
        raise UsageError(f"--protocol {protocol} reads the images in data order, as CLIP_benchmark does; "
                         f"--num-workers {args.num_workers} interleaves them: expected 0 or 1")  # fmt: skip


def check_numbers(args: argparse.Namespace) -> None:
    for name in ("batch_size", "num_examples", "examples_top_k"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} is {getattr(args, name)}; expected an integer >= 1")
    if getattr(args, "dim", None) is not None and args.dim < 1:
        raise UsageError(f"--dim is {args.dim}; expected an integer >= 1 (a prefix of the embedding)")
    if getattr(args, "top_k", 1) < 1:
        raise UsageError(f"--top-k is {args.top_k}; expected an integer >= 1")
    if not 0.0 <= getattr(args, "fusion", 0.0) <= 1.0:
        raise UsageError(f"--fusion is {args.fusion}; expected a weight in [0, 1]")
    if getattr(args, "reranker", None) is not None and not Path(args.reranker).exists():
        raise UsageError(
            f"--reranker {args.reranker} does not exist; expected a cross-encoder .ckpt or a folder written by "
            "`mmret export`"
        )
    if args.num_workers < 0:
        raise UsageError(f"--num-workers is {args.num_workers}; expected an integer >= 0")
