"""`python -m mmret.cli ...` (like `python -m mmret ...`): the same as the `mmret` console script."""

from mmret.cli import entry_point

entry_point()
