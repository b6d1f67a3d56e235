"""Files mmret ships beside its code — experiment recipes (`experiments/`) and sbatch templates (`slurm/`) —
found the same way from a source checkout and from an installed wheel.

    shipped_path("experiments/demo/pipeline.yaml")    # the file itself, wherever mmret runs from
    resolve_shipped("experiments/digits_clip.yaml")   # a user's path as given, else the shipped file of that name

In a checkout (and an editable install) these are the repository's own `experiments/` and `slurm/`; a wheel
carries copies of them as package data under `mmret/shipped/` (pyproject.toml maps the folders there), so
`mmret demo` and `mmret sweep` work from any directory after a plain `pip install`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmret.errors import UsageError

_PACKAGE = Path(__file__).resolve().parent
SHIPPED_FOLDERS = ("experiments", "slurm")


def _roots() -> list[Path]:
    """Where shipped files are looked for, in order: the wheel's package data, then the source checkout."""
    return [_PACKAGE / "shipped", _PACKAGE.parent]


def shipped_path(relative: str | os.PathLike) -> Path:
    """The shipped file `relative` (e.g. "slurm/train.sbatch").

    Raises:
        UsageError: no such file ships with this installation.
    """
    relative = Path(relative)
    if relative.is_absolute() or not relative.parts or relative.parts[0] not in SHIPPED_FOLDERS:
        raise ValueError(f"{relative}: expected a path under one of {SHIPPED_FOLDERS}")
    for root in _roots():
        candidate = root / relative
        if candidate.is_file():
            return candidate
    raise UsageError(
        f"{relative} is not part of this mmret installation (looked in {', '.join(str(r) for r in _roots())}); "
        "reinstall mmret or pass the file's path"
    )


def resolve_shipped(path: str | os.PathLike) -> Path:
    """`path` when it exists (relative to the working directory); else, for a relative path under
    `experiments/` or `slurm/`, the shipped file of that name; else `path` unchanged (the caller reports it)."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] not in SHIPPED_FOLDERS:
        return path
    for root in _roots():
        if (root / path).is_file():
            return root / path
    return path
