"""The reranking throughput benchmark runs end to end in its quick form and prints its table.

.venv/bin/pytest tests/test_rerank_benchmark.py -q
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "rerank_throughput.py"


@pytest.mark.slow
def test_quick_benchmark_prints_a_row_per_k():
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--queries", "4"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.strip()[:3].strip().isdigit()]
    assert [int(row.split("|")[0]) for row in rows] == [10, 50]
    for row in rows:
        assert float(row.split("|")[1]) > 0  # pairs/s
