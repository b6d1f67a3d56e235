"""The vector database under `mmret index`: LanceDB, embedded by default, any LanceDB URI otherwise.

    store = VectorStore.connect("runs/shapes.index")            # a local folder: embedded, in this process
    store = VectorStore.connect("s3://bucket/shapes.index")     # object storage, same code
    store = VectorStore.connect("db://my-project", api_key=...) # LanceDB Cloud / Enterprise server
    store.add("images", table)                                   # a pyarrow table with a `vector` column
    hits = store.search("images", queries, k=10)                 # [Q] lists of (row, score), best first

Why LanceDB (measured, README "Search"): in-process like SQLite, appends in a fraction of a second, IVF-PQ
(compressed) and HNSW indexes, exact (flat) search when a table has no index, and a columnar table that holds each
vector's metadata beside it. Milvus Lite, the other embedded candidate, offers no IVF-PQ (its vectors stay
uncompressed: twice the disk) and answered single queries about eight times slower on the same vectors
(experiments/benchmarks/search.py --compare-milvus).

Scores are inner products of L2-normalised vectors (cosine similarity), exactly what `mmret eval` ranks by.
Tables with fewer rows than `approximate_above` are searched exactly (every row scored); above it `mmret index`
builds an IVF-PQ index and searches refine the approximate candidates with exact scores.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmret.errors import UsageError

for _logger in ("LANCE_LOG", "LANCEDB_LOG"):  # the Rust loggers otherwise warn on stderr about routine writes
    os.environ.setdefault(_logger, "error")

MANIFEST_TABLE = "mmret_manifest"


@dataclass(frozen=True)
class AnnSettings:
    """How an approximate (IVF-PQ) index is built and searched.

    Args:
        partitions: IVF lists; None: about sqrt(rows).
        sub_vectors: PQ sub-vectors; None: dim / 8 (each codes 8 dimensions in a byte).
        nprobes: lists searched per query.
        refine_factor: candidates re-scored exactly per result asked for (k × refine_factor).
    """

    partitions: int | None = None
    sub_vectors: int | None = None
    nprobes: int = 32
    refine_factor: int = 10

    def partitions_for(self, rows: int) -> int:
        return self.partitions or max(1, min(4096, round(math.sqrt(rows))))

    def sub_vectors_for(self, dim: int) -> int:
        if self.sub_vectors:
            return self.sub_vectors
        for width in (8, 4, 2, 1):
            if dim % width == 0:
                return dim // width
        return dim


def _lancedb():
    try:
        import lancedb
    except ImportError:  # a core dependency; only a broken environment lacks it
        raise UsageError("the index needs the lancedb package; run `pip install lancedb`") from None
    return lancedb


class VectorStore:
    """Tables of vectors with their metadata in one LanceDB database, plus a small JSON manifest table."""

    def __init__(self, db, uri: str) -> None:
        self.db, self.uri = db, uri

    @classmethod
    def connect(cls, uri: str | os.PathLike, **options) -> VectorStore:
        """Open (or create) the database at `uri`: a local folder, `s3://...`, `gs://...`, or `db://...`."""
        return cls(_lancedb().connect(str(uri), **options), str(uri))

    def tables(self) -> list[str]:
        listed = self.db.list_tables() if hasattr(self.db, "list_tables") else self.db.table_names()
        names = getattr(listed, "tables", listed)
        return list(names)

    def has(self, table: str) -> bool:
        return table in self.tables()

    # ---- the manifest: one JSON document, replaced as a whole -----------------------------------------------
    def read_manifest(self) -> dict | None:
        if not self.has(MANIFEST_TABLE):
            return None
        rows = self.db.open_table(MANIFEST_TABLE).to_arrow().to_pylist()
        return json.loads(rows[0]["document"]) if rows else None

    def write_manifest(self, document: dict) -> None:
        """Replace the manifest (a new table version: readers see the old document or the new one)."""
        import pyarrow as pa

        data = pa.table({"document": [json.dumps(document, sort_keys=True)]})
        self.db.create_table(MANIFEST_TABLE, data, mode="overwrite")

    # ---- rows -------------------------------------------------------------------------------------------
    def add(self, table: str, rows) -> None:
        """Append a pyarrow table (a `vector` fixed-size-list column plus metadata), creating the table."""
        if self.has(table):
            self.db.open_table(table).add(rows)
        else:
            self.db.create_table(table, rows)

    def delete_where(self, table: str, predicate: str) -> None:
        if self.has(table):
            self.db.open_table(table).delete(predicate)

    def count(self, table: str) -> int:
        return self.db.open_table(table).count_rows() if self.has(table) else 0

    def rows_where(self, table: str, predicate: str, columns: Sequence[str] | None = None) -> list[dict]:
        query = self.db.open_table(table).search().where(predicate)
        if columns is not None:
            query = query.select(list(columns))
        return query.limit(None).to_arrow().to_pylist()

    # ---- indexes and search -----------------------------------------------------------------------------
    def build_ann_index(self, table: str, dim: int, settings: AnnSettings) -> dict:
        """(Re)build the IVF-PQ index of `table` over all its rows; returns what was built."""
        rows = self.count(table)
        partitions, sub_vectors = settings.partitions_for(rows), settings.sub_vectors_for(dim)
        self.db.open_table(table).create_index(
            metric="dot", index_type="IVF_PQ", num_partitions=partitions, num_sub_vectors=sub_vectors,
            replace=True,
        )  # fmt: skip
        return {"type": "IVF_PQ", "partitions": partitions, "sub_vectors": sub_vectors, "rows": rows}

    def drop_ann_index(self, table: str) -> None:
        handle = self.db.open_table(table)
        for index in handle.list_indices():
            handle.drop_index(index.name)

    def search(
        self,
        table: str,
        queries: np.ndarray,
        k: int,
        exact: bool,
        settings: AnnSettings = AnnSettings(),
        columns: Sequence[str] | None = None,
    ) -> list[list[tuple[dict, float]]]:
        """The k best rows of each query [Q, D] by inner product, best first, as (row, score) pairs.

        exact: score every row (brute force); otherwise use the table's approximate index (IVF-PQ lists
        `nprobes`, then k × `refine_factor` candidates re-scored exactly).
        """
        handle = self.db.open_table(table)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        results: list[list[tuple[dict, float]]] = []
        for query in queries:
            search = handle.search(query).metric("dot").limit(k)
            if exact:
                search = search.bypass_vector_index()
            else:
                search = search.nprobes(settings.nprobes).refine_factor(settings.refine_factor)
            if columns is not None:
                search = search.select([*columns, "_distance"])
            rows = search.to_arrow().to_pylist()
            # LanceDB's "dot" distance is 1 - <q, v>; ties keep the table's row order (stable sort below).
            scored = [(row, 1.0 - float(row.pop("_distance"))) for row in rows]
            scored.sort(key=lambda pair: -pair[1])
            results.append(scored)
        return results
