"""Benchmark: `mmret serve` under concurrent load on localhost — errors, throughput, p50/p99 latency, with and
without reranking.

    .venv/bin/python experiments/benchmarks/serve_load.py --index /tmp/serve_bench_index \
        --reranker /work/runs/rr_wsd60/checkpoints/last.ckpt
    .venv/bin/python experiments/benchmarks/serve_load.py --index INDEX --clients 2 --queries 20   # a smoke run

The index used for the numbers below (the shapes test split, 1000 images, embedded by the WSD 60-epoch dual
encoder, `test-vit-tiny` towers):

    .venv/bin/python -c "from mmret.serving.index import build_index; import glob; build_index(
        '/work/runs/wsd60/checkpoints/last.ckpt', sorted(glob.glob('data/shapes/test/*.tar')), '/tmp/serve_bench_index')"

What runs: the real service, `python -m mmret serve INDEX [--reranker CKPT]` as a subprocess bound to
127.0.0.1 on a free port (nothing else is contacted), started and stopped by this script. Then, for each mode,
`--clients` threads (default 8), each with its own `httpx.Client` (a kept-alive connection), send `--queries`
requests one after another (default 200 each, 1600 per mode) to `POST /search` with `k` 10:

- dual encoder: `{"text": caption, "k": 10}`: the text tower, then an exact search over the index;
- reranked: `{"text": caption, "k": 10, "rerank": true, "rerank_top": 10}`: the same, then the cross-encoder
  scores the 10 (query, image) pairs (stored images read from the shards) and reorders them.

Queries are captions of the index's own images, drawn with a fixed seed (`--seed`), so each request does the
work a real query does. Each mode starts with `--warmup` untimed requests. Latency is per request as a client
sees it (queueing included: the service runs one model forward pass at a time); throughput is requests over
the mode's wall time; "server ms" is the median of the service's own `timing_ms.total` (its search, waits for
the model lock included; the rest is HTTP, JSON and the thread pool). Before the concurrent run, each mode is
also timed with one client alone (`--single-queries` requests): the latency of a request that never waits.
Errors are non-200 answers, transport failures and answers without k results; they must be 0.

Output: a table on stdout and a JSON document (`--output`, default
experiments/benchmarks/results/serve_load.json). Timings are wall-clock on a shared machine; the clients run on
the same cores as the service.

Measured 2026-12-07 on 2 CPU cores (AMD EPYC) shared with other jobs (load average 2.8 -> 4.3 during the
run), torch's default threads in the service, k 10 (results/serve_load.json):

    | mode                          | requests | errors | req/s | p50 ms | p99 ms | server ms |
    |-------------------------------|----------|--------|-------|--------|--------|-----------|
    | dual encoder, 1 client        |       50 |      0 |  68.2 |   14.3 |   20.7 |      12.1 |
    | dual encoder, 8 clients       |     1600 |      0 |  74.9 |  106.2 |  137.4 |     101.5 |
    | reranked (top 10), 1 client   |       50 |      0 |  14.2 |   70.4 |   91.4 |      67.3 |
    | reranked (top 10), 8 clients  |     1600 |      0 |  20.3 |  391.4 |  561.9 |     387.2 |

No request failed. Throughput under load is what one request's model work allows (the forward passes are
serialised: ~13 ms of text tower and search per query, ~55 ms more for the reranker's 10 pairs), so 8 clients
mostly queue: p50 is 5-8 x the single-client time. HTTP, JSON and the thread pool add ~2-3 ms per request.
Before the service's listening socket got TCP_NODELAY (mmret/cli/serve.py), every answer on a kept-alive
connection waited ~40 ms for the client's delayed ACK; this benchmark is how that was found.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results" / "serve_load.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def index_captions(index: str) -> list[str]:
    """Every caption of the index's images (what users would type, more or less)."""
    from mmret.serving.index import IMAGES, SearchIndex

    rows = SearchIndex.open(index).store.rows_where(IMAGES, "true", columns=["captions"])
    return sorted({caption for row in rows for caption in row["captions"] or []})


class Service:
    """`mmret serve` in a subprocess on 127.0.0.1: started on entry, stopped (SIGTERM) on exit."""

    def __init__(self, args: argparse.Namespace, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "mmret", "serve", args.index, "--host", "127.0.0.1",
                        "--port", str(self.port), "--device", args.device]  # fmt: skip
        self.command += ["--model", args.model] if args.model else []
        self.command += ["--reranker", args.reranker] if args.reranker else []
        self.env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        self.log = log

    def __enter__(self) -> Service:
        with open(self.log, "wb") as output:
            self.process = subprocess.Popen(
                self.command, stdout=output, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"mmret serve exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                self.health = httpx.get(f"{self.url}/health", timeout=2).json()
                return self
            except httpx.TransportError:
                time.sleep(0.2)
        self.__exit__()
        raise SystemExit(f"mmret serve did not answer within 300 s: {self.log.read_text()}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def warm_up(url: str, payload: dict, queries: list[str], count: int) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        for query in queries[:count]:
            client.post("/search", json={**payload, "text": query}).raise_for_status()


def run_mode(url: str, payload: dict, queries: list[str], clients: int, per_client: int, seed: int) -> dict:
    """`clients` threads x `per_client` requests of `payload` with a random caption each."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    server_ms: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client_thread(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        with httpx.Client(base_url=url, timeout=120) as client:
            barrier.wait()
            for _ in range(per_client):
                body = {**payload, "text": rng.choice(queries)}
                start = time.perf_counter()
                try:
                    response = client.post("/search", json=body)
                    elapsed = time.perf_counter() - start
                    answer = response.json()
                    if response.status_code != 200 or len(answer.get("results", ())) != payload["k"]:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                        continue
                except (httpx.HTTPError, ValueError) as error:
                    errors.append(f"{type(error).__name__}: {error}")
                    continue
                latencies[number].append(elapsed * 1000)
                server_ms[number].append(answer["timing_ms"]["total"])

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    flat = sorted(ms for per_client in latencies for ms in per_client)
    server = [ms for per_client in server_ms for ms in per_client]
    requests = clients * per_client

    def quantile(q: float) -> float:
        return flat[min(len(flat) - 1, int(q * len(flat)))] if flat else float("nan")

    return {
        "payload": {key: value for key, value in payload.items() if key != "text"},
        "clients": clients,
        "requests": requests,
        "errors": len(errors),
        "first_errors": errors[:5],
        "wall_s": round(wall, 2),
        "throughput_rps": round(requests / wall, 1),
        "latency_ms": {
            "p50": round(quantile(0.50), 1),
            "p90": round(quantile(0.90), 1),
            "p99": round(quantile(0.99), 1),
            "max": round(flat[-1], 1) if flat else None,
            "mean": round(statistics.fmean(flat), 1) if flat else None,
        },
        "server_ms_p50": round(statistics.median(server), 1) if server else None,
    }


def print_table(modes: dict) -> None:
    header = ["mode", "requests", "errors", "req/s", "p50 ms", "p99 ms", "mean ms", "server ms"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, mode in modes.items():
        latency = mode["latency_ms"]
        cells = [name, mode["requests"], mode["errors"], mode["throughput_rps"], latency["p50"], latency["p99"],
                 latency["mean"], mode["server_ms_p50"]]  # fmt: skip
        print("| " + " | ".join(str(cell) for cell in cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--index", required=True, help="an index folder written by `mmret index` / build_index"
    )
    parser.add_argument(
        "--model", default=None, help="the dual encoder (default: the index's own checkpoint)"
    )
    parser.add_argument(
        "--reranker", default=None, help="a reranker checkpoint; without it only the first mode runs"
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (threads)")
    parser.add_argument("--queries", type=int, default=200, help="requests per client and mode")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument(
        "--rerank-top", type=int, default=10, help="first-stage results the reranker rescores"
    )
    parser.add_argument("--warmup", type=int, default=16, help="untimed requests before each mode")
    parser.add_argument(
        "--single-queries", type=int, default=50, help="requests of the one-client run per mode"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="OMP_NUM_THREADS of the service (0: torch's default)"
    )
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS), help=f"JSON results (default {RESULTS})")
    args = parser.parse_args()
    if args.clients < 1 or args.queries < 1 or args.rerank_top < args.k:
        parser.error("expected --clients >= 1, --queries >= 1 and --rerank-top >= --k")

    queries = index_captions(args.index)
    random.Random(args.seed).shuffle(queries)
    with tempfile.TemporaryDirectory() as work, Service(args, Path(work) / "serve.log") as service:
        health = service.health
        print(f"service at {service.url}: {health['images']} images, {health['model']}, reranker {health['reranker']}; "
              f"{len(queries)} distinct captions as queries", flush=True)  # fmt: skip
        plans = {"dual encoder": {"k": args.k}}
        if args.reranker:
            plans[f"reranked (top {args.rerank_top})"] = {
                "k": args.k,
                "rerank": True,
                "rerank_top": args.rerank_top,
            }
        modes = {}
        for number, (name, payload) in enumerate(plans.items()):
            warm_up(service.url, payload, queries, args.warmup)
            if args.single_queries:
                print(f"{name}: 1 client x {args.single_queries} queries ...", flush=True)
                single = run_mode(
                    service.url, payload, queries, 1, args.single_queries, args.seed + 100 + number
                )
                modes[f"{name}, 1 client"] = single
            print(f"{name}: {args.clients} clients x {args.queries} queries ...", flush=True)
            modes[f"{name}, {args.clients} clients"] = run_mode(
                service.url, payload, queries, args.clients, args.queries, args.seed + number
            )
    print_table(modes)
    results = {
        "benchmark": "serve_load",
        "date": date.today().isoformat(),
        "index": args.index,
        "images": health["images"],
        "model": health["model"],
        "reranker": args.reranker,
        "clients": args.clients,
        "queries_per_client": args.queries,
        "k": args.k,
        "threads": args.threads or "torch default",
        "device": args.device,
        "machine": machine(),
        "modes": modes,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {output}")
    errors = sum(mode["errors"] for mode in modes.values())
    if errors:
        print(
            f"{errors} requests failed, e.g. {next(m['first_errors'] for m in modes.values() if m['errors'])}"
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
