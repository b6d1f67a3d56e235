"""Benchmark: exact retrieval metrics of mmret vs torchmetrics on a COCO-sized problem (time, memory, values).

    .venv/bin/python experiments/benchmarks/eval_speed.py            # 5,000 images x 25,000 captions, ~2 min
    .venv/bin/python experiments/benchmarks/eval_speed.py --quick    # 1,000 x 5,000, ~25 s

Data: random unit image embeddings (D=512); each image has 5 captions whose embeddings are the image's plus
Gaussian noise, renormalised (noise chosen so text->image recall@1 is about 0.5, not saturated). Every method
runs in its own subprocess on the same saved embeddings, from embeddings to metric values (the score matmul
is included for both), for both directions: recall@1/5/10, mrr@10, ndcg@10, map@10.

torchmetrics needs the flattened score matrix with a target and a query index per pair (125M pairs here) and
loops over queries in Python; it cannot run the full problem in minutes or in memory, so it runs on the first
`--torchmetrics-fraction` of the queries of each direction (against all candidates), mmret runs on the same
subset (measured ratio, identical work) and on the full problem. The torchmetrics full-size row is a linear
extrapolation and labelled so: its work is linear in the number of queries (per-query loop, memory per pair),
except one n log n index sort, so the extrapolated time is if anything a little low.

Memory is the peak resident set size of the worker process above its RSS just before the timed call: the
kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs right before the call, so it sees every
CPU allocation (torch tensors included, which tracemalloc does not). With `--device cuda` it is
`torch.cuda.max_memory_allocated` instead. mAP: mmret divides by min(|R|, 10), torchmetrics by the relevant
items found in the top 10; the values table compares torchmetrics with mmret's per-query values converted to
torchmetrics' convention (identical when a query has one relevant item, as in image retrieval).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

KS = (1, 5, 10)
RANKING_K = 10
DIRECTIONS = ("image_retrieval", "text_retrieval")


def make_data(num_images: int, captions_per_image: int, dim: int, noise: float, seed: int) -> dict:
    """Unit image embeddings and, per image, captions = image + noise (renormalised)."""
    generator = torch.Generator().manual_seed(seed)
    image_emb = F.normalize(torch.randn(num_images, dim, generator=generator), dim=1)  # [N, D]
    owner = torch.arange(num_images).repeat_interleave(captions_per_image)  # [M] image of each caption
    noise_emb = noise * torch.randn(owner.numel(), dim, generator=generator) / dim**0.5  # norm ~ noise
    text_emb = F.normalize(image_emb[owner] + noise_emb, dim=1)  # [M, D]
    return {"image_emb": image_emb, "text_emb": text_emb, "owner": owner}


def subset_sizes(data: dict, fraction: float) -> tuple[int, int]:
    """Number of text and image queries in the subset that torchmetrics (and mmret, for parity) evaluate."""
    num_texts, num_images = data["text_emb"].shape[0], data["image_emb"].shape[0]
    return max(1, round(fraction * num_texts)), max(1, round(fraction * num_images))


# ---------------------------------------------------------------------------------------------- workers
def run_mmret_full(data: dict, device: str, chunk_size: int | None) -> dict:
    from mmret.evaluation.metrics import retrieval_metrics

    image_emb, text_emb = data["image_emb"].to(device), data["text_emb"].to(device)
    image_ids = torch.arange(image_emb.shape[0])
    return retrieval_metrics(
        image_emb, image_ids, text_emb, data["owner"], KS, RANKING_K, chunk_size=chunk_size
    )


def run_mmret_subset(data: dict, device: str, chunk_size: int | None, fraction: float) -> dict:
    """mmret on exactly torchmetrics' queries; mAP also converted to torchmetrics' convention."""
    from mmret.evaluation.ranking import Relevance, embedding_scores, per_query_metrics

    num_text_queries, num_image_queries = subset_sizes(data, fraction)
    image_emb, text_emb, owner = data["image_emb"].to(device), data["text_emb"].to(device), data["owner"]
    problems = {
        "image_retrieval": (
            text_emb[:num_text_queries],
            image_emb,
            owner[:num_text_queries],
            torch.arange(len(image_emb)),
        ),
        "text_retrieval": (image_emb[:num_image_queries], text_emb, torch.arange(num_image_queries), owner),
    }
    results = {}
    for direction, (queries, candidates, query_labels, candidate_labels) in problems.items():
        relevance = Relevance.from_labels(query_labels, candidate_labels)
        per_query = per_query_metrics(
            embedding_scores(queries, candidates), relevance, KS, chunk_size=chunk_size
        )
        summary = per_query.summarize()
        for key in [f"recall@{k}" for k in KS] + [f"{name}@{RANKING_K}" for name in ("mrr", "ndcg", "map")]:
            results[f"{direction}_{key}"] = summary[key]
        found = per_query.values[f"precision@{RANKING_K}"] * RANKING_K  # [Q] relevant items in the top 10
        best_possible = relevance.num_relevant().clamp(max=RANKING_K).to(torch.float64)
        tm_map = torch.where(
            found > 0, per_query.values[f"map@{RANKING_K}"] * best_possible / found.clamp_min(1), 0
        )
        results[f"{direction}_map@{RANKING_K} (torchmetrics convention)"] = float(
            tm_map[per_query.valid].mean()
        )
    return results


def run_torchmetrics_subset(data: dict, device: str, fraction: float) -> dict:
    from torchmetrics import MetricCollection
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP, RetrievalMRR, RetrievalNormalizedDCG

    num_text_queries, num_image_queries = subset_sizes(data, fraction)
    image_emb, text_emb, owner = (
        data["image_emb"].to(device),
        data["text_emb"].to(device),
        data["owner"].to(device),
    )
    problems = {
        "image_retrieval": (
            text_emb[:num_text_queries] @ image_emb.T,
            owner[:num_text_queries, None] == torch.arange(len(image_emb), device=device),
        ),
        "text_retrieval": (
            image_emb[:num_image_queries] @ text_emb.T,
            torch.arange(num_image_queries, device=device)[:, None] == owner,
        ),
    }
    results = {}
    for direction, (scores, target) in problems.items():  # scores, target: [Q, C]
        metrics = {f"recall@{k}": RetrievalHitRate(top_k=k, empty_target_action="skip") for k in KS}
        metrics[f"mrr@{RANKING_K}"] = RetrievalMRR(top_k=RANKING_K, empty_target_action="skip")
        metrics[f"ndcg@{RANKING_K}"] = RetrievalNormalizedDCG(top_k=RANKING_K, empty_target_action="skip")
        metrics[f"map@{RANKING_K} (torchmetrics convention)"] = RetrievalMAP(
            top_k=RANKING_K, empty_target_action="skip"
        )
        collection = MetricCollection(metrics).to(device)
        indexes = torch.arange(scores.shape[0], device=device).repeat_interleave(scores.shape[1])  # [Q * C]
        collection.update(scores.reshape(-1), target.reshape(-1), indexes=indexes)
        del scores, target, indexes
        results.update({f"{direction}_{key}": float(value) for key, value in collection.compute().items()})
    return results


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    """Run one method in this (fresh) process and write its time, memory and values as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    data = torch.load(args.data)
    method = {
        "mmret": lambda: run_mmret_full(data, args.device, args.chunk_size),
        "mmret-subset": lambda: run_mmret_subset(
            data, args.device, args.chunk_size, args.torchmetrics_fraction
        ),
        "torchmetrics-subset": lambda: run_torchmetrics_subset(data, args.device, args.torchmetrics_fraction),
    }[args.worker]
    cuda = args.device.startswith("cuda")
    if cuda:  # CUDA context, cuBLAS handle and first kernel launches are start-up costs, not the method's
        warm = torch.ones(64, 64, device=args.device)
        (warm @ warm).topk(2, dim=1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before_bytes = torch.cuda.memory_allocated()
    try:  # reset the kernel's RSS high-water mark so the peak is the timed call's own
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    rss_before = _rss_kib("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    values = method()
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if cuda:
        peak_mib = (torch.cuda.max_memory_allocated() - before_bytes) / 2**20
    else:
        peak_kib = _rss_kib("VmHWM") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mib = (peak_kib - rss_before) / 1024
    result = {"wall_s": wall, "cpu_s": cpu, "peak_mib": peak_mib, "hwm_reset": hwm_reset, "values": values}
    Path(args.output).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------- driver
def run_worker(name: str, args: argparse.Namespace, data_path: Path, tmp: Path) -> dict:
    output = tmp / f"{name}.json"
    command = [sys.executable, __file__, "--worker", name, "--data", str(data_path), "--output", str(output)]
    command += ["--device", args.device, "--torchmetrics-fraction", str(args.torchmetrics_fraction)]
    command += ["--threads", str(args.threads)] + (
        ["--chunk-size", str(args.chunk_size)] if args.chunk_size else []
    )
    print(f"running {name} ...", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(output.read_text())


def report(args: argparse.Namespace, data: dict, results: dict) -> bool:
    num_images, num_texts = data["image_emb"].shape[0], data["text_emb"].shape[0]
    num_text_queries, num_image_queries = subset_sizes(data, args.torchmetrics_fraction)
    full_queries = f"{num_texts:,} text + {num_images:,} image queries"
    subset_queries = f"{num_text_queries:,} text + {num_image_queries:,} image queries"
    scale = num_texts / num_text_queries  # both directions use the same fraction
    memory = "peak GPU memory (MiB)" if args.device.startswith("cuda") else "peak RSS above start (MiB)"
    ours, ours_subset, theirs = results["mmret"], results["mmret-subset"], results["torchmetrics-subset"]
    print(
        f"\n{num_images:,} images x {num_texts:,} captions, D={data['image_emb'].shape[1]}, device={args.device}, "
        f"torch threads={torch.get_num_threads() if not args.threads else args.threads}\n"
    )
    rows = [  # (method, queries, result, time multiplier, ratio note)
        ("mmret `retrieval_metrics`", full_queries, ours, 1.0, "vs extrapolated"),
        (f"torchmetrics, extrapolated x{scale:g} (not run)", full_queries, theirs, scale, None),
        ("mmret metrics, subset", subset_queries, ours_subset, 1.0, "measured"),
        ("torchmetrics, subset", subset_queries, theirs, 1.0, None),
    ]
    print(f"| method | queries | wall time (s) | CPU time (s) | {memory} | torchmetrics / mmret wall time |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for method, queries, result, multiplier, note in rows:
        approx = "~" if multiplier != 1.0 else ""
        ratio = ""
        if note:
            reference = theirs["wall_s"] * (scale if result is ours else 1.0)
            ratio = f"{reference / result['wall_s']:,.0f}x ({note})"
        print(
            f"| {method} | {queries} | {approx}{result['wall_s'] * multiplier:,.2f} | "
            f"{approx}{result['cpu_s'] * multiplier:,.2f} | {approx}{result['peak_mib'] * multiplier:,.0f} | {ratio} |"
        )

    print(f"\nValues on the subset ({subset_queries}):\n")
    print("| metric | mmret | torchmetrics | abs diff |")
    print("| --- | ---: | ---: | ---: |")
    worst = 0.0
    for key, theirs_value in theirs["values"].items():
        diff = abs(ours_subset["values"][key] - theirs_value)
        worst = max(worst, diff)
        print(f"| {key} | {ours_subset['values'][key]:.6f} | {theirs_value:.6f} | {diff:.1e} |")
    print(
        "\nFull problem (mmret): "
        + ", ".join(
            f"{key}={ours['values'][key]:.4f}" for key in ours["values"] if "recall@1" in key or "ndcg" in key
        )
    )
    # torchmetrics accumulates in float32, so agreement is to float32 rounding, not bit-exact
    agree = worst < 1e-5
    print(f"\nvalues agree (max abs diff {worst:.1e} < 1e-5): {agree}")
    return agree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 images x 5,000 captions (about 25 s)")
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument(
        "--noise", type=float, default=6.0, help="caption noise norm relative to the unit image"
    )
    parser.add_argument(
        "--torchmetrics-fraction",
        type=float,
        default=None,
        help="share of each direction's queries given to torchmetrics (default 0.04, quick 0.1)",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="mmret queries per chunk (default: auto)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per worker (0: torch's default)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.num_images = 1000
    if args.torchmetrics_fraction is None:
        args.torchmetrics_fraction = 0.1 if args.quick else 0.04
    data = make_data(args.num_images, args.captions_per_image, args.dim, args.noise, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "data.pt"
        torch.save(data, data_path)
        results = {
            name: run_worker(name, args, data_path, Path(tmp))
            for name in ("mmret", "mmret-subset", "torchmetrics-subset")
        }
    return 0 if report(args, data, results) else 1


if __name__ == "__main__":
    sys.exit(main())
