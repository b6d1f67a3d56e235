r"""Benchmark: mmret's vector index (LanceDB IVF-PQ through `VectorStore`) vs FAISS through autofaiss, side by side.

    .venv/bin/python experiments/benchmarks/search.py --output experiments/benchmarks/results/search_cpu.json
    .venv/bin/python experiments/benchmarks/search.py --num-vectors 100000 --compare-milvus \
        --output experiments/benchmarks/results/search_cpu_100k_milvus.json
    .venv/bin/python experiments/benchmarks/search.py --local-dim 0 \
        --output experiments/benchmarks/results/search_cpu_isotropic.json          # the harder data, below
    .venv/bin/python experiments/benchmarks/search.py --num-vectors 20000 --queries 200     # ~1 min, a smoke run

On 2 cores the 1,000,000-vector runs took 6 and 10 minutes, the 100,000-vector one with Milvus Lite 6 (the
first run also creates `.venv-autofaiss`, about a minute); peak memory about 4.5 GB (autofaiss's build).

What is measured, per system, on the same vectors and queries in the same run: build time (vectors on disk to a
searchable index), size on disk, peak RSS of the build process and of the search process, recall@10 of the
approximate search against the exact top-10, and p50 / p99 latency of single queries (one query per call, as a
server answers them). Ratios are mmret (LanceDB) ÷ FAISS (autofaiss): below 1, mmret costs less.

- mmret: `mmret.serving.store.VectorStore` as `mmret index` uses it: `add` in chunks of 100,000 rows (a `key`
  int64 column and the `vector` column), `build_ann_index` with the default `AnnSettings` (IVF-PQ, about sqrt(N)
  partitions, dim / 8 sub-vectors, metric dot), `search(..., exact=False, columns=["key"])` one query at a time.
  Search settings start at `AnnSettings()` (nprobes 32, refine_factor 10) and are raised only while recall@10
  on the tuning queries is below `--target-recall` (0.95): double whichever of the two raises it more, then
  bisect the last one doubled down to about its smallest passing value. Exact (flat) LanceDB search is timed on
  `--exact-queries` queries for reference.
- FAISS: autofaiss, clip-retrieval's indexing stack: its `clip_index` calls `autofaiss.build_index` with
  max_index_memory_usage 4G and current_memory_available 16G (metric ip, all cores); so does this benchmark.
  autofaiss chooses the index (at these sizes HNSW32 over the full vectors, as it fits in 4G) and its efSearch
  for a 10 ms query budget. Reported at the smallest efSearch reaching the target recall on the tuning queries
  (doubling, then bisection; the column the ratios use) and at autofaiss's own efSearch (what clip-retrieval
  serves with). autofaiss pins numpy<2 and this venv has numpy 2, so it runs in `.venv-autofaiss` (created by
  `python3 -m venv` and `pip install autofaiss faiss-cpu "numpy<2" "pyarrow<22"` when missing; pyarrow 22 and
  later need numpy 2) through experiments/benchmarks/search_autofaiss_worker.py.
- Milvus Lite (`--compare-milvus`): pymilvus's `MilvusClient` on a local .db (milvus-lite 3: in-process, faiss
  HNSW per segment; no IVF-PQ), HNSW M 32, efConstruction 40 (FAISS's HNSW32 above), metric IP, inserted 5,000
  rows per call; ef tuned like efSearch; build time runs until the collection is indexed and loaded.

Each system builds in one subprocess and searches in a fresh one, so each peak RSS (the kernel's high-water mark,
VmHWM) is that process's own; the search process's is read before the exact reference queries. Workers read the
vectors from the .npy with plain reads in 100,000-row chunks (a memory map would count the file in their RSS).
All searches run against a warm page cache (everything was just written). Timings are wall clock on a shared
machine: each worker's result records the load average after it (above ~2 on 2 cores: other jobs competed).

Data: synthetic, deterministic (`--seed`), generated in chunks. Uniform random unit vectors would defeat every ANN
method and are nothing like embeddings, so the vectors are a mixture of 1000 clusters: random unit centres,
sizes drawn log-normally (sigma 1: median about 60 members per 100,000 vectors, 5% of clusters under 12, the
largest about 1,300), each vector = centre + an offset of norm about `--noise` (1.0) × a per-cluster factor
uniform in 0.75-1.25, L2-normalised (cosine to its own centre about 0.7, to other centres about 0). By default
90% of an offset's variance lies in `--local-dim` (16) directions of its own cluster and 10% (`--isotropic`) in
all 512, so neighbourhoods have a low intrinsic dimension as embeddings do: a query's top-1 / top-10 / top-100
cosine is about 0.79 / 0.68 / 0.44 at 100,000 vectors. `--local-dim 0` makes the offsets isotropic (top-1 0.57,
top-10 0.54): within a cluster the nearest neighbours are then barely nearer than any other member, a much
harder search for every method. Queries come from the same distribution but are not in the table; the
`--tune-queries` (200) pick the search settings, the other `--queries` (500) are timed and scored. Ground truth:
exact top-10 by inner product (numpy float32, in chunks), the same for every system.

Caveat: the clusters are well separated (centres nearly orthogonal), which suits IVF (k-means partitions line up
with the clusters) and hurts HNSW (a graph walk can stay in the wrong cluster: on 300,000 of these vectors, faiss
HNSW32 at efSearch 64 returned only other clusters' vectors for 8% of queries). Real embedding clusters overlap;
check recall on your own vectors before taking the HNSW columns as general.

Measured 2026-12-07, 2 CPU cores (AMD EPYC), 24 GiB RAM, Python 3.11, lancedb 0.41.0, autofaiss 2.18.0 with
faiss-cpu 1.15.1, pymilvus 3.0.2 with milvus-lite 3.2.2. "FAISS" is autofaiss's index at the smallest efSearch
reaching 0.95 on the tuning queries (the ratios use it), "FAISS, its efSearch" the same index at autofaiss's own
choice. The machine was shared (load averages 1.8-3.6 after the workers): the 100,000-vector LanceDB index took
40 to 94 s in four runs, autofaiss's build 31 to 51 s, so read build times to within a factor of 2.

1,000,000 x 512, default data (results/search_cpu.json):

    |                       | mmret | FAISS | FAISS, its efSearch | mmret ÷ FAISS |
    | --------------------- | ----: | ----: | ------------------: | ------------: |
    | build time (s)        | 105.2 | 172.3 |               172.3 |          0.61 |
    | on-disk size (MiB)    | 2,025 | 2,213 |               2,213 |          0.91 |
    | peak RSS build (MiB)  | 2,288 | 4,356 |               4,356 |          0.53 |
    | peak RSS search (MiB) |   769 | 2,269 |               2,269 |          0.34 |
    | recall@10             | 0.985 | 0.961 |               0.956 |          1.02 |
    | p50 latency (ms)      |  5.58 | 13.77 |                9.60 |          0.41 |
    | p99 latency (ms)      |  8.66 | 20.29 |               13.92 |          0.43 |

mmret reaches recall 0.985 with the default `AnnSettings` (1000 partitions, 64 sub-vectors, nprobes 32,
refine_factor 10); autofaiss builds HNSW32, which needs efSearch 4096 for 0.95 here (autofaiss chose 3180:
recall 0.956). Both keep the full vectors on disk (LanceDB's table beside 64-byte PQ codes; HNSW32's vectors
and graph); LanceDB searches from disk while FAISS holds its whole index in memory, hence a third of the search
RSS. LanceDB exact (flat) search: p50 1.7 s, p99 2.0 s.

100,000 x 512 with Milvus Lite (`--num-vectors 100000 --compare-milvus`; results/search_cpu_100k_milvus.json):

    |                       | mmret | FAISS | FAISS, its efSearch | Milvus Lite | ÷ FAISS | ÷ Milvus |
    | --------------------- | ----: | ----: | ------------------: | ----------: | ------: | -------: |
    | build time (s)        |  93.9 |  31.0 |                31.0 |        92.5 |    3.03 |     1.02 |
    | on-disk size (MiB)    |   203 |   221 |                 221 |         407 |    0.92 |     0.50 |
    | peak RSS build (MiB)  | 1,788 |   659 |                 659 |       2,391 |    2.71 |     0.75 |
    | peak RSS search (MiB) |   703 |   276 |                 276 |       1,136 |    2.55 |     0.62 |
    | recall@10             | 0.979 | 0.962 |               0.999 |       0.985 |    1.02 |     0.99 |
    | p50 latency (ms)      |  5.57 |  0.11 |                9.56 |       44.34 |   48.78 |     0.13 |
    | p99 latency (ms)      | 12.27 |  0.26 |               10.69 |      104.05 |   46.94 |     0.12 |

At this size efSearch 60 is enough for HNSW32 (0.962), and FAISS answers in 0.11 ms: mmret's 5.6 ms, the same
as at 1,000,000 vectors, is mostly the per-call cost of `VectorStore.search` (it opens the table and runs a
LanceDB query plan per call). Milvus Lite reaches 0.985 at ef 16 but answers in 44 ms (p99 104 ms), 8 times
mmret's; its files take twice the space. milvus-lite 3 runs inside the client process (no server subprocess).
LanceDB exact search: p50 219 ms.

1,000,000 x 512, isotropic offsets (`--local-dim 0`; results/search_cpu_isotropic.json):

    |                       | mmret | FAISS | FAISS, its efSearch | mmret ÷ FAISS |
    | --------------------- | ----: | ----: | ------------------: | ------------: |
    | build time (s)        | 110.1 | 283.2 |               283.2 |          0.39 |
    | on-disk size (MiB)    | 2,025 | 2,213 |               2,213 |          0.91 |
    | peak RSS build (MiB)  | 2,306 | 4,356 |               4,356 |          0.53 |
    | peak RSS search (MiB) |   779 | 2,269 |               2,269 |          0.34 |
    | recall@10             | 0.940 | 0.960 |               0.935 |          0.98 |
    | p50 latency (ms)      | 12.64 | 28.75 |               11.31 |          0.44 |
    | p99 latency (ms)      | 19.87 | 66.94 |               26.23 |          0.30 |

On this harder data mmret needs refine_factor 57 (nprobes stays 32): 0.950 on the tuning queries, 0.940 on the
measured ones, just under the target (raise `--tune-queries` or the target for a margin); HNSW32 needs
efSearch 5888, and autofaiss's own 2781 gives 0.935.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from search_autofaiss_worker import (
    first_passing,
    folder_bytes,
    latency_summary,
    npy_rows,
    peak_rss_mib,
    read_rows,
    recall_at_k,
    smallest_passing,
    timed_queries,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TABLE = "vectors"
MILVUS_COLLECTION = "vectors"
AUTOFAISS_REQUIREMENTS = ["autofaiss", "faiss-cpu", "numpy<2", "pyarrow<22"]  # pyarrow>=22 needs numpy 2
MILVUS_HNSW = {"M": 32, "efConstruction": 40}
TUNING_STEPS = 12  # doublings of LanceDB's search knobs tried at most


# ---------------------------------------------------------------------------------------------- data
def mixture(dim: int, clusters: int, noise: float, local_dim: int, isotropic: float, seed: int) -> dict:
    """The mixture's parameters: unit centres [C, D], cluster probabilities [C], per-cluster offset norms [C],
    per-cluster orthonormal bases [C, D, local_dim] of the offsets' main directions (None when local_dim is 0)
    and the share of the offsets' variance spread over all directions."""
    rng = np.random.default_rng([seed, 0])
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 1.0, clusters)
    spread = (noise * rng.uniform(0.75, 1.25, clusters)).astype(np.float32)
    bases = None
    if local_dim:
        bases = np.linalg.qr(rng.standard_normal((clusters, dim, local_dim), dtype=np.float32))[0]
    return {
        "centres": centres,
        "weights": weights / weights.sum(),
        "spread": spread,
        "bases": bases,
        "isotropic": isotropic if local_dim else 1.0,
    }


def sample(model: dict, count: int, stream: list[int]) -> np.ndarray:
    """`count` unit vectors [count, D] drawn from the mixture with the random stream `stream`."""
    rng = np.random.default_rng(stream)
    centres, bases, isotropic = model["centres"], model["bases"], model["isotropic"]
    owner = rng.choice(len(centres), size=count, p=model["weights"])
    dim = centres.shape[1]
    offsets = rng.standard_normal((count, dim), dtype=np.float32) * np.float32(np.sqrt(isotropic / dim))
    if bases is not None:  # the rest of the variance along the owner cluster's own local_dim directions
        local_dim = bases.shape[2]
        local = rng.standard_normal((count, local_dim), dtype=np.float32)
        local *= np.float32(np.sqrt((1 - isotropic) / local_dim))
        order = np.argsort(owner, kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(len(centres) + 1))
        for cluster in range(len(centres)):
            rows = order[bounds[cluster] : bounds[cluster + 1]]
            offsets[rows] += local[rows] @ bases[cluster].T
    offsets *= model["spread"][owner][:, None]  # norm ~ spread
    vectors = centres[owner] + offsets
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def write_data(args: argparse.Namespace, workdir: Path) -> None:
    """base/emb.npy [N, D] (written chunk by chunk), queries.npy, tune_queries.npy and their exact top-k."""
    model = mixture(args.dim, args.clusters, args.noise, args.local_dim, args.isotropic, args.seed)
    base = workdir / "base" / "emb.npy"
    base.parent.mkdir(parents=True)
    with open(base, "wb") as handle:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(handle, {**header, "shape": (args.num_vectors, args.dim)})
        for chunk, start in enumerate(range(0, args.num_vectors, args.chunk_rows)):
            count = min(args.chunk_rows, args.num_vectors - start)
            handle.write(sample(model, count, [args.seed, 1, chunk]).tobytes())
    queries = sample(model, args.queries, [args.seed, 2])
    tune_queries = sample(model, args.tune_queries, [args.seed, 3])
    truth = exact_top_k(base, np.concatenate([queries, tune_queries]), args.k, args.chunk_rows)
    np.save(workdir / "queries.npy", queries)
    np.save(workdir / "tune_queries.npy", tune_queries)
    np.save(workdir / "truth.npy", truth[: args.queries])
    np.save(workdir / "tune_truth.npy", truth[args.queries :])


def exact_top_k(base: Path, queries: np.ndarray, k: int, chunk_rows: int) -> np.ndarray:
    """Row ids [Q, k] of the k largest inner products of each query over every row of `base`, best first."""
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    best_scores = np.empty((len(queries), 0), dtype=np.float32)
    for start in range(0, npy_rows(base), chunk_rows):
        scores = queries @ read_rows(base, start, start + chunk_rows).T  # [Q, rows]
        top = (
            np.argpartition(-scores, k - 1, axis=1)[:, :k]
            if scores.shape[1] > k
            else np.argsort(-scores, axis=1)
        )
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        best_ids = np.concatenate([best_ids, top + start], axis=1)
        order = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]  # earlier rows first among ties
        best_scores, best_ids = (
            np.take_along_axis(best_scores, order, axis=1),
            np.take_along_axis(best_ids, order, axis=1),
        )
    return best_ids


def load_eval(workdir: Path) -> dict:
    return {
        name: np.load(workdir / f"{name}.npy") for name in ("queries", "truth", "tune_queries", "tune_truth")
    }


# ------------------------------------------------------------------------------------ workers: LanceDB
def lancedb_build(args: argparse.Namespace, workdir: Path) -> dict:
    import pyarrow as pa

    from mmret.serving.store import AnnSettings, VectorStore

    base, where = workdir / "base" / "emb.npy", workdir / "lancedb"
    store = VectorStore.connect(where)
    start = time.perf_counter()
    rows = npy_rows(base)
    for first in range(0, rows, args.chunk_rows):
        vectors = read_rows(base, first, first + args.chunk_rows)
        keys = pa.array(np.arange(first, first + len(vectors)), pa.int64())
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        store.add(TABLE, pa.table({"key": keys, "vector": column}))
    add_s = time.perf_counter() - start
    built = store.build_ann_index(TABLE, args.dim, AnnSettings())
    build_s = time.perf_counter() - start
    return {
        "build_s": build_s,
        "add_s": add_s,
        "index_s": build_s - add_s,
        "index": built,
        "disk_bytes": folder_bytes(where),
        "peak_rss_mib": peak_rss_mib(),
    }


def lance_settings(recall_of, start: tuple[int, int], partitions: int, target: float) -> tuple[int, int]:
    """LanceDB's (nprobes, refine_factor), from `start`: while the tuning recall is short of `target`, double
    the knob that raises it more; once a doubling reaches it, bisect that knob down to its smallest such value."""
    setting = start
    for _ in range(TUNING_STEPS):
        if recall_of(setting) >= target:
            return setting
        nprobes, refine_factor = setting
        raised = {(min(2 * nprobes, partitions), refine_factor), (nprobes, 2 * refine_factor)} - {setting}
        best = max(sorted(raised), key=recall_of)
        if recall_of(best) >= target:
            break
        setting = best
    else:
        return setting  # still short after TUNING_STEPS doublings: the last one
    (nprobes, refine_factor), (top_nprobes, top_refine) = setting, best
    if top_nprobes != nprobes:
        smallest = first_passing(
            lambda value: recall_of((value, refine_factor)) >= target, nprobes, top_nprobes
        )
        return smallest, refine_factor
    return nprobes, first_passing(
        lambda value: recall_of((nprobes, value)) >= target, refine_factor, top_refine
    )


def lancedb_search(args: argparse.Namespace, workdir: Path) -> dict:
    import lancedb

    from mmret.serving.store import AnnSettings, VectorStore

    store, data = VectorStore.connect(workdir / "lancedb"), load_eval(workdir)

    def searcher(settings: AnnSettings, exact: bool = False):
        def search_one(query: np.ndarray) -> list[int]:
            hits = store.search(TABLE, query[None], args.k, exact=exact, settings=settings, columns=["key"])
            return [row["key"] for row, _ in hits[0]]

        return search_one

    tried: dict[tuple[int, int], float] = {}

    def recall_of(setting: tuple[int, int]) -> float:
        if setting not in tried:
            nprobes, refine_factor = setting
            settings = AnnSettings(nprobes=nprobes, refine_factor=refine_factor)
            found, _ = timed_queries(searcher(settings), data["tune_queries"], warmup=0)
            tried[setting] = recall_at_k(found, data["tune_truth"])
        return tried[setting]

    defaults = AnnSettings()
    start = (defaults.nprobes, defaults.refine_factor)
    setting = lance_settings(
        recall_of, start, defaults.partitions_for(store.count(TABLE)), args.target_recall
    )
    settings = AnnSettings(nprobes=setting[0], refine_factor=setting[1])
    found, seconds = timed_queries(searcher(settings), data["queries"], args.warmup)
    result = {
        "settings": {"nprobes": settings.nprobes, "refine_factor": settings.refine_factor},
        "tuning": [
            {"nprobes": nprobes, "refine_factor": refine_factor, "tune_recall": recall}
            for (nprobes, refine_factor), recall in tried.items()
        ],
        "recall": recall_at_k(found, data["truth"]),
        **latency_summary(seconds),
        "peak_rss_mib": peak_rss_mib(),
        "lancedb": lancedb.__version__,
    }
    if args.exact_queries:
        queries = data["queries"][: args.exact_queries]
        found, seconds = timed_queries(searcher(settings, exact=True), queries, warmup=1)
        result["exact"] = {
            "recall": recall_at_k(found, data["truth"][: len(queries)]),
            **latency_summary(seconds),
        }
    return result


# ------------------------------------------------------------------------------------- workers: Milvus
def milvus_build(args: argparse.Namespace, workdir: Path) -> dict:
    from pymilvus import DataType, MilvusClient

    base, where = workdir / "base" / "emb.npy", workdir / "milvus.db"
    start = time.perf_counter()
    client = MilvusClient(str(where))
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("key", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=args.dim)
    client.create_collection(MILVUS_COLLECTION, schema=schema)
    rows = npy_rows(base)
    for first in range(0, rows, args.chunk_rows):
        vectors = read_rows(base, first, first + args.chunk_rows)
        for offset in range(0, len(vectors), args.milvus_batch):
            batch = vectors[offset : offset + args.milvus_batch]
            keys = range(first + offset, first + offset + len(batch))
            client.insert(
                MILVUS_COLLECTION, [{"key": key, "vector": row} for key, row in zip(keys, batch.tolist())]
            )
    client.flush(MILVUS_COLLECTION)
    add_s = time.perf_counter() - start
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="vector", index_type="HNSW", metric_type="IP", params=MILVUS_HNSW)
    client.create_index(MILVUS_COLLECTION, index_params)
    client.load_collection(MILVUS_COLLECTION)
    build_s = time.perf_counter() - start
    client.close()
    return {
        "build_s": build_s,
        "add_s": add_s,
        "index_s": build_s - add_s,
        "index": {"type": "HNSW", **MILVUS_HNSW, "rows": rows},
        "disk_bytes": folder_bytes(where),
        "peak_rss_mib": peak_rss_mib(),
    }


def milvus_search(args: argparse.Namespace, workdir: Path) -> dict:
    from importlib.metadata import version

    from pymilvus import MilvusClient

    client, data = MilvusClient(str(workdir / "milvus.db")), load_eval(workdir)
    client.load_collection(MILVUS_COLLECTION)

    def searcher(ef: int):
        params = {"metric_type": "IP", "params": {"ef": ef}}

        def search_one(query: np.ndarray) -> list[int]:
            hits = client.search(
                MILVUS_COLLECTION,
                data=[query.tolist()],
                limit=args.k,
                output_fields=["key"],
                search_params=params,
            )
            return [hit["key"] for hit in hits[0]]

        return search_one

    def tune_recall(ef: int) -> float:
        found, _ = timed_queries(searcher(ef), data["tune_queries"], warmup=0)
        return recall_at_k(found, data["tune_truth"])

    ef, tried = smallest_passing(tune_recall, max(16, args.k), 2**14, args.target_recall)
    found, seconds = timed_queries(searcher(ef), data["queries"], args.warmup)
    result = {
        "settings": {"ef": ef},
        "tuning": tried,
        "recall": recall_at_k(found, data["truth"]),
        **latency_summary(seconds),
        "peak_rss_mib": peak_rss_mib(),
        "pymilvus": version("pymilvus"),
        "milvus_lite": version("milvus-lite"),
    }
    client.close()
    return result


WORKERS = {
    "lancedb-build": lancedb_build,
    "lancedb-search": lancedb_search,
    "milvus-build": milvus_build,
    "milvus-search": milvus_search,
}


# ---------------------------------------------------------------------------------------------- driver
def autofaiss_python(venv: Path) -> Path:
    """The interpreter of the autofaiss venv, created (python3 -m venv, pip install) when missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} for autofaiss (needs numpy<2) ...", file=sys.stderr, flush=True)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *AUTOFAISS_REQUIREMENTS], check=True)
    probe = subprocess.run([str(python), "-c", "import autofaiss, faiss"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise SystemExit(
            f"{python} cannot import autofaiss and faiss:\n{probe.stderr.strip()}\n"
            f"delete {venv} to have it recreated, or install {' '.join(AUTOFAISS_REQUIREMENTS)} into it"
        )
    return python


def run_worker(command: list[str], label: str, output: Path) -> dict:
    print(f"{label} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    result = json.loads(output.read_text())
    result["load_average_after"] = os.getloadavg()  # 1, 5, 15 min; above ~2 (2 cores): other jobs competed
    print(f"{label}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return result


def ours(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    output = workdir / f"{name}.json"
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--workdir",
        str(workdir),
        "--worker-output",
        str(output),
    ]
    command += ["--dim", str(args.dim), "--k", str(args.k), "--target-recall", str(args.target_recall)]
    command += ["--chunk-rows", str(args.chunk_rows), "--warmup", str(args.warmup)]
    command += ["--exact-queries", str(args.exact_queries), "--milvus-batch", str(args.milvus_batch)]
    return run_worker(command, name, output)


def faiss_worker(phase: str, python: Path, args: argparse.Namespace, workdir: Path) -> dict:
    output = workdir / f"faiss-{phase}.json"
    command = [str(python), str(HERE / "search_autofaiss_worker.py"), phase, str(workdir), str(output)]
    command += [
        "--max-index-memory",
        args.faiss_max_index_memory,
        "--current-memory",
        args.faiss_current_memory,
    ]
    command += ["--k", str(args.k), "--target-recall", str(args.target_recall), "--warmup", str(args.warmup)]
    command += ["--index-key", args.faiss_index_key] if args.faiss_index_key else []
    return run_worker(command, f"faiss-{phase}", output)


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "python": platform.python_version(),
    }


ROWS = [  # (label, key in a system's summary, format)
    ("build time (s)", "build_s", "{:,.1f}"),
    ("on-disk size (MiB)", "disk_mib", "{:,.0f}"),
    ("peak RSS, build (MiB)", "build_rss_mib", "{:,.0f}"),
    ("peak RSS, search (MiB)", "search_rss_mib", "{:,.0f}"),
    ("recall@10 vs exact", "recall", "{:.4f}"),
    ("p50 latency (ms)", "p50_ms", "{:,.2f}"),
    ("p99 latency (ms)", "p99_ms", "{:,.2f}"),
]


def summary(system: dict, search: dict | None = None) -> dict:
    """The table's figures of one system; `search`: the timed search to report (default: system["search"])."""
    build, search = system["build"], search or system["search"]
    return {
        "build_s": build["build_s"],
        "disk_mib": build["disk_bytes"] / 2**20,
        "build_rss_mib": build["peak_rss_mib"],
        "search_rss_mib": system["search"]["peak_rss_mib"],
        "recall": search["recall"],
        "p50_ms": search["p50_ms"],
        "p99_ms": search["p99_ms"],
    }


SYSTEMS = {  # summary key: column label
    "lancedb": "mmret (LanceDB IVF-PQ)",
    "faiss": "FAISS (autofaiss)",
    "faiss_autofaiss_setting": "FAISS, autofaiss's search setting",
    "milvus": "Milvus Lite (HNSW)",
}
RATIOS = {"lancedb_vs_faiss": "mmret ÷ FAISS", "lancedb_vs_milvus": "mmret ÷ Milvus Lite"}


def report(results: dict) -> str:
    """A markdown table of every system and the ratios, and notes on the settings used."""
    systems = [key for key in SYSTEMS if key in results["summary"]]
    ratios = [key for key in RATIOS if key in results["ratios"]]
    config = results["config"]
    head = [f"{config['num_vectors']:,} x {config['dim']}", *(SYSTEMS[key] for key in systems)]
    lines = ["| " + " | ".join(head + [RATIOS[key] for key in ratios]) + " |"]
    lines.append("| --- |" + " ---: |" * (len(systems) + len(ratios)))
    for label, key, form in ROWS:
        cells = [form.format(results["summary"][system][key]) for system in systems]
        cells += [f"{results['ratios'][name][key]:.2f}" for name in ratios]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lance, faiss = results["lancedb"], results["faiss"]
    index = lance["build"]["index"]
    notes = [
        f"mmret: {index['partitions']} partitions, {index['sub_vectors']} sub-vectors; searched with nprobes "
        f"{lance['search']['settings']['nprobes']}, refine_factor {lance['search']['settings']['refine_factor']}; "
        f"build = add {lance['build']['add_s']:.1f} s + index {lance['build']['index_s']:.1f} s",
        f"FAISS: autofaiss built {faiss['build']['index_key']} and chose {faiss['build']['autofaiss_param']!r} "
        f"(its 10 ms budget); the smallest setting reaching recall {config['target_recall']} on the tuning "
        f"queries: {faiss['search']['param']!r}",
    ]
    if "exact" in lance["search"]:
        exact = lance["search"]["exact"]
        notes.append(
            f"LanceDB exact (flat) search, {exact['queries']} queries: p50 {exact['p50_ms']:,.1f} ms, "
            f"p99 {exact['p99_ms']:,.1f} ms, recall@10 {exact['recall']:.4f}"
        )
    if "milvus" in results:
        milvus = results["milvus"]
        notes.append(
            f"Milvus Lite: HNSW M {MILVUS_HNSW['M']}, efConstruction {MILVUS_HNSW['efConstruction']}; searched "
            f"with ef {milvus['search']['settings']['ef']}; build = insert {milvus['build']['add_s']:.1f} s + "
            f"index and load {milvus['build']['index_s']:.1f} s"
        )
    return "\n".join(lines + [""] + [f"- {note}" for note in notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=500, help="queries timed and scored (recall@k)")
    parser.add_argument(
        "--tune-queries", type=int, default=200, help="other queries that pick search settings"
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=1.0, help="offset norm relative to the unit centre")
    parser.add_argument(
        "--local-dim", type=int, default=16, help="directions of a cluster's offsets (0: all, isotropic)"
    )
    parser.add_argument(
        "--isotropic", type=float, default=0.1, help="share of the offsets' variance in every direction"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-rows", type=int, default=100_000, help="rows per generated / added chunk")
    parser.add_argument("--warmup", type=int, default=20, help="untimed queries before the timed ones")
    parser.add_argument(
        "--exact-queries", type=int, default=20, help="LanceDB exact-search queries timed (0: none)"
    )
    parser.add_argument("--compare-milvus", action="store_true", help="also measure Milvus Lite (HNSW)")
    parser.add_argument("--milvus-batch", type=int, default=5000, help="rows per Milvus insert call")
    parser.add_argument("--faiss-max-index-memory", default="4G", help="autofaiss max_index_memory_usage")
    parser.add_argument("--faiss-current-memory", default="16G", help="autofaiss current_memory_available")
    parser.add_argument(
        "--faiss-index-key", default=None, help="force a faiss index key (default: autofaiss picks)"
    )
    parser.add_argument("--autofaiss-venv", type=Path, default=REPO / ".venv-autofaiss")
    parser.add_argument(
        "--workdir", type=Path, help="keep the data and indexes here (default: a temporary folder)"
    )
    parser.add_argument(
        "--output", type=Path, help="write the results here as JSON (rewritten after each step)"
    )
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](args, args.workdir)
        args.worker_output.write_text(json.dumps(result, indent=2))
        return 0
    if args.num_vectors <= args.k or args.queries < 1 or args.tune_queries < 1:
        parser.error("need --num-vectors > --k and at least one query and one tuning query")

    python = autofaiss_python(args.autofaiss_venv)
    if args.workdir and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mmret-search-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "config": {key: value for key, value in vars(args).items() if key not in ("worker", "worker_output")},
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    results["config"] = json.loads(json.dumps(results["config"], default=str))

    def save() -> None:
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(results, indent=2) + "\n")

    try:
        start = time.perf_counter()
        print(
            f"writing {args.num_vectors:,} x {args.dim} vectors and exact top-{args.k} ...",
            file=sys.stderr,
            flush=True,
        )
        write_data(args, workdir)
        results["data_s"] = time.perf_counter() - start
        results["lancedb"] = {"build": ours("lancedb-build", args, workdir)}
        results["lancedb"]["search"] = ours("lancedb-search", args, workdir)
        save()
        results["faiss"] = {"build": faiss_worker("build", python, args, workdir)}
        results["faiss"]["search"] = faiss_worker("search", python, args, workdir)
        save()
        if args.compare_milvus:
            results["milvus"] = {"build": ours("milvus-build", args, workdir)}
            results["milvus"]["search"] = ours("milvus-search", args, workdir)
        systems = [name for name in ("lancedb", "faiss", "milvus") if name in results]
        results["summary"] = {name: summary(results[name]) for name in systems}
        faiss_own = summary(results["faiss"], results["faiss"]["search"]["autofaiss_setting"])
        results["summary"]["faiss_autofaiss_setting"] = faiss_own
        ours_summary = results["summary"]["lancedb"]
        results["ratios"] = {
            f"lancedb_vs_{other}": {
                key: ours_summary[key] / results["summary"][other][key] for _, key, _ in ROWS
            }
            for other in systems[1:]
        }
        results["table"] = report(results)
        save()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(results["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
