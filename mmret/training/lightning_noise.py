"""Lines Lightning prints on every run that tell an mmret user nothing, silenced for `mmret fit` and friends.

    silence_lightning_noise()   # idempotent; call before the Trainer is built

Dropped: the device census ("GPU available: False, used: False", "TPU available ..."; the device a run uses is
in its run_info.json), the advert for a hosted logger, a note that the LR schedule counted the train loader, the hint to prefix `srun` printed whenever SLURM's
binaries are installed (our SLURM path, `mmret sweep`, already runs the tasks under srun), a deprecation
warning Lightning raises about its own code, and its warning about modules in eval mode at the start of training
(mmret's locked towers are, on purpose), and its advice to sync validation metrics over ranks (mmret's are
computed from embeddings gathered from every rank: equal on each). Everything else Lightning says (its warnings about your settings,
the model summary, the progress bar) is kept.
"""

from __future__ import annotations

import logging
import warnings

_INFO_PREFIXES = (
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "💡 Tip:",
    "Loading `train_dataloader` to estimate number of stepping batches",
)
_WARNINGS = (
    r"The `srun` command is available on your system but is not used",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Locked towers (model.lock_image / lock_text) are put in eval mode on purpose (frozen norm statistics).
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Validation metrics come from embeddings gathered from every rank: each rank logs the same values.
    r"It is recommended to use `self.log\('val/.*sync_dist=True\)` when logging on epoch level",
)
_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_INFO_PREFIXES)


_FILTER = _DropNoise()


def silence_lightning_noise() -> None:
    """Install the filters (logging filters on Lightning's rank-zero loggers, warning filters by message)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message)
