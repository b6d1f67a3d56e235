r"""The FAISS side of experiments/benchmarks/search.py, run by it with the `.venv-autofaiss` interpreter.

    .venv-autofaiss/bin/python experiments/benchmarks/search_autofaiss_worker.py build WORKDIR OUT.json \
        --max-index-memory 4G --current-memory 16G [--index-key KEY]
    .venv-autofaiss/bin/python experiments/benchmarks/search_autofaiss_worker.py search WORKDIR OUT.json \
        --k 10 --target-recall 0.95

autofaiss pins numpy<2 and the project's venv has numpy 2, so this file needs nothing but the standard library
and numpy at import time (faiss and autofaiss are imported inside the phases). search.py imports the helpers
below (`read_rows`, `recall_at_k`, `latency_summary`, ...) so every system is measured by the same code.

- build: `autofaiss.build_index` on WORKDIR/base (the .npy the driver wrote), as clip-retrieval's `clip_index`
  calls it (its defaults: max_index_memory_usage 4G, current_memory_available 16G, metric ip, all cores).
  autofaiss picks the index type, trains and fills it, picks its search parameters for its query-time budget
  (10 ms), measures itself and writes the index file. Reported: the wall time of that call, the index file's
  size and this process's peak RSS.
- search: a fresh process loads the index file and times `index.search` one query at a time on the evaluation
  queries twice: with the smallest value of the recall knob (efSearch of HNSW, nprobe of IVF) whose recall@k
  on the tuning queries reaches the target (doubling, then bisection; the setting compared with mmret's), and
  with the search parameters autofaiss chose for its 10 ms budget (what clip-retrieval serves with).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------- shared with search.py


def read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a 2-D C-order .npy file, read with ordinary file reads (no memory map).

    A memory map would leave the touched file pages in the reader's resident set, which is not what a
    system costs; a plain read costs only the rows' own buffer.
    """
    with open(path, "rb") as handle:
        shape, fortran_order, dtype = _npy_header(handle)
        if fortran_order or len(shape) != 2:
            raise ValueError(f"{path}: expected a 2-D C-order array, got shape {shape}")
        stop = min(stop, shape[0])
        handle.seek(start * shape[1] * dtype.itemsize, 1)
        rows = np.fromfile(handle, dtype=dtype, count=max(0, stop - start) * shape[1])
    return rows.reshape(-1, shape[1])


def _npy_header(handle) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy file open in `handle`, left at the first data byte."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    return np.lib.format.read_array_header_2_0(handle)


def npy_rows(path: Path) -> int:
    """The number of rows of a .npy file, from its header."""
    with open(path, "rb") as handle:
        return _npy_header(handle)[0][0]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k; found [Q, <=k] row ids (-1: none), truth [Q, k]."""
    k = truth.shape[1]
    hits = [len(set(row[row >= 0].tolist()) & set(exact.tolist())) for row, exact in zip(found, truth)]
    return float(np.mean(hits) / k)


def latency_summary(seconds: list[float]) -> dict:
    """p50 / p99 / mean of per-query latencies, in milliseconds."""
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "queries": len(ms),
    }


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB: the kernel's high-water mark of its memory (VmHWM).

    Not `getrusage(...).ru_maxrss`: Linux carries that over fork and exec, so a worker started by a big driver
    would report the driver's peak.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def folder_bytes(path: Path) -> int:
    """Total size of the files under `path` (or of `path` itself when it is a file)."""
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def smallest_passing(recall_of, start: int, limit: int, target: float) -> tuple[int, list[dict]]:
    """The smallest integer knob value in [start, limit] whose recall reaches `target` (recall taken as rising
    with the knob): doubling from `start`, then bisection between the last value short of it and the first
    one reaching it. Returns the value (`limit` if none reaches it) and every (value, recall) tried."""
    tried: dict[int, float] = {}

    def passes(value: int) -> bool:
        if value not in tried:
            tried[value] = recall_of(value)
        return tried[value] >= target

    short, value = None, start
    while not passes(value) and value < limit:
        short, value = value, min(2 * value, limit)
    if passes(value) and short is not None:
        value = first_passing(passes, short, value)
    return value, [{"value": key, "tune_recall": recall} for key, recall in tried.items()]


def first_passing(passes, short: int, value: int) -> int:
    """About the smallest integer in (short, value] where `passes` holds, by bisection (given passes(value)),
    to within 1/16 of it: recall measured on a few hundred queries is not finer than that."""
    while value - short > max(1, value // 16):
        middle = (short + value) // 2
        short, value = (short, middle) if passes(middle) else (middle, value)
    return value


def timed_queries(search_one, queries: np.ndarray, warmup: int) -> tuple[np.ndarray, list[float]]:
    """Run `search_one(query) -> ids` per query after `warmup` untimed ones; returns ids [Q, k], seconds."""
    for query in queries[:warmup]:
        search_one(query)
    ids, seconds = [], []
    for query in queries:
        start = time.perf_counter()
        found = search_one(query)
        seconds.append(time.perf_counter() - start)
        ids.append(found)
    width = max((len(row) for row in ids), default=0)
    padded = np.full((len(ids), width), -1, dtype=np.int64)
    for row, found in enumerate(ids):
        padded[row, : len(found)] = found
    return padded, seconds


# ---------------------------------------------------------------------------------------------- faiss


def build(args: argparse.Namespace) -> dict:
    from importlib.metadata import version

    from autofaiss import build_index

    workdir = Path(args.workdir)
    index_path, infos_path = workdir / "faiss" / "knn.index", workdir / "faiss" / "index_infos.json"
    index_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    index, infos = build_index(
        embeddings=str(workdir / "base"),
        index_path=str(index_path),
        index_infos_path=str(infos_path),
        index_key=args.index_key,
        metric_type="ip",
        max_index_memory_usage=args.max_index_memory,
        current_memory_available=args.current_memory,
        verbose=30,  # logging.WARNING: autofaiss logs every step at INFO
    )
    build_s = time.perf_counter() - start
    if index is None or not index_path.exists():
        raise RuntimeError(f"autofaiss.build_index built no index (see its log above); it returned {infos}")
    return {
        "autofaiss": version("autofaiss"),
        "build_s": build_s,
        "disk_bytes": folder_bytes(index_path),
        "peak_rss_mib": peak_rss_mib(),
        "index_key": infos["index_key"],
        "autofaiss_param": infos["index_param"],
        "max_index_memory_usage": args.max_index_memory,
        "current_memory_available": args.current_memory,
        "rows": int(index.ntotal),
    }


def _knob(param: str, value: int) -> str | None:
    """`param` with its recall knob set to `value`: efSearch of an HNSW index, nprobe of an IVF one (whose
    HNSW quantizer, if any, gets efSearch = 2 * nprobe, as autofaiss sets it); None for a flat index."""
    values = dict(item.split("=") for item in param.split(",") if item)
    if "nprobe" in values:
        values["nprobe"] = str(value)
        if "efSearch" in values:
            values["efSearch"] = str(2 * value)
    elif "efSearch" in values:
        values["efSearch"] = str(value)
    else:
        return None
    return ",".join(f"{key}={item}" for key, item in values.items())


def search(args: argparse.Namespace) -> dict:
    import faiss

    workdir = Path(args.workdir)
    built = json.loads((workdir / "faiss" / "index_infos.json").read_text())
    index = faiss.read_index(str(workdir / "faiss" / "knn.index"))
    space = faiss.ParameterSpace()
    tune_queries, tune_truth = np.load(workdir / "tune_queries.npy"), np.load(workdir / "tune_truth.npy")
    queries, truth = np.load(workdir / "queries.npy"), np.load(workdir / "truth.npy")

    def search_one(query: np.ndarray) -> np.ndarray:
        return index.search(query[None], args.k)[1][0]

    def measured(param: str) -> dict:
        if param:
            space.set_index_parameters(index, param)
        ids, seconds = timed_queries(search_one, queries, args.warmup)
        return {"param": param, "recall": recall_at_k(ids, truth), **latency_summary(seconds)}

    def tune_recall(value: int) -> float:
        space.set_index_parameters(index, _knob(built["index_param"], value))
        return recall_at_k(index.search(tune_queries, args.k)[1], tune_truth)

    param, tried = built["index_param"], []
    if _knob(param, 1) is not None:  # not a flat index (exact already): tune its knob
        ivf = "nprobe" in param
        value, tried = smallest_passing(tune_recall, 1 if ivf else 16, 2**16, args.target_recall)
        param = _knob(param, value)
    tuned = measured(param)
    autofaiss_setting = measured(built["index_param"])  # what clip-retrieval would serve with
    return {
        "index_key": built["index_key"],
        **tuned,
        "tuning": tried,
        "autofaiss_setting": autofaiss_setting,
        "peak_rss_mib": peak_rss_mib(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("build", "search"))
    parser.add_argument("workdir", help="the folder search.py wrote the vectors, queries and truth into")
    parser.add_argument("output", help="write the phase's results here as JSON")
    parser.add_argument("--max-index-memory", default="4G", help="autofaiss max_index_memory_usage")
    parser.add_argument("--current-memory", default="16G", help="autofaiss current_memory_available")
    parser.add_argument("--index-key", default=None, help="a faiss index key (default: autofaiss picks)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--warmup", type=int, default=20, help="untimed queries before timing")
    args = parser.parse_args(argv)
    result = build(args) if args.phase == "build" else search(args)
    Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
