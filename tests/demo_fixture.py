"""The `quick_demo` fixture: `mmret demo --quick` run once per test session, for the demo's, the notebooks' and
the README tour's tests.

    from tests.demo_fixture import quick_demo  # noqa: F401  (fixture)

Several test modules import the fixture; pytest would run a session fixture once per importing module, so the
finished run is kept here, keyed by the session's temporary folder.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmret.cli import main


@dataclass(frozen=True)
class QuickDemo:
    """A finished `mmret demo --quick`: its output folder and what it printed."""

    output: Path
    printed: str


_RUNS: dict[Path, QuickDemo] = {}


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> QuickDemo:
    output = tmp_path_factory.getbasetemp() / "quick_demo"
    if output not in _RUNS:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main(["demo", "--output", str(output), "--quick"])
        assert code == 0, printed.getvalue()[-4000:]
        _RUNS[output] = QuickDemo(output, printed.getvalue())
    return _RUNS[output]
