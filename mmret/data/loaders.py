"""DataLoaders over the batch streams: they collect the workers' skip counts and, for training, keep the epoch
and the position inside it so that Lightning can save and resume it.

`TrainLoader` is *stateful* in Lightning's sense (`state_dict` / `load_state_dict`): a mid-epoch checkpoint
stores `{"epoch", "batches_seen"}`, and on resume Lightning hands it back, which calls
`TrainStream.set_resume_position` — the rest of that epoch is then drawn from a fresh shuffle. The epoch to
stream is read from the Lightning trainer (`epoch_fn`) when an iteration starts, or set with `set_epoch`;
workers are started per iteration, so they always see the current epoch.

    loader = TrainLoader(stream, num_workers=2, epoch_fn=lambda: trainer.current_epoch)
    for batch in loader: ...
    loader.skipped   # Counter of skipped samples by reason, summed over workers
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from mmret.data.samples import SKIPPED_KEY
from mmret.data.streams import EvalStream, TrainStream


def _pass_through(batch: Any) -> Any:
    """The streams yield whole batches already; module-level so spawned workers can unpickle it."""
    return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGINT / SIGTERM to the main process, which saves and then shuts them down.

    Ctrl-C and `scancel` signal the whole process group. A worker killed by SIGTERM would make PyTorch abort
    the main process's iteration ("DataLoader worker ... is killed by signal") before the fit reaches its
    batch boundary to save; workers still exit when the main process is gone (PyTorch's parent watchdog).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _BatchStreamLoader(DataLoader):
    """A DataLoader over a stream of ready batches that strips and sums the skip counts they carry."""

    def __init__(self, stream: IterableDataset, num_workers: int):
        super().__init__(
            stream,
            batch_size=None,  # the stream batches inside the workers
            num_workers=num_workers,
            collate_fn=_pass_through,
            worker_init_fn=_ignore_stop_signals,
            pin_memory=torch.cuda.is_available(),
            # Workers start with each iteration and so receive the stream's current epoch and resume position
            # by copy. Persistent workers would save one fork per epoch, but their live iterators are inherited
            # by the next loader's forked workers, which then fail to shut them down ("can only test a child
            # process" at garbage collection).
            persistent_workers=False,
        )
        self.skipped: Counter[str] = Counter()

    def _batches(self, iterator: Iterator[dict]) -> Iterator[dict]:
        for batch in iterator:
            skipped = batch.pop(SKIPPED_KEY, None)
            if skipped:
                self.skipped.update(skipped)
            if batch:  # an item holding only skip counts is not a batch
                yield batch


class EvalLoader(_BatchStreamLoader):
    """Loader over an `EvalStream`: each sample once, stable order.

    Args:
        stream: The evaluation stream (already bound to a rank and world size).
        num_workers: DataLoader worker processes.
    """

    def __init__(self, stream: EvalStream, num_workers: int):
        super().__init__(stream, num_workers)

    def __iter__(self) -> Iterator[dict]:
        return self._batches(super().__iter__())


class TrainLoader(_BatchStreamLoader):
    """Loader over a `TrainStream` that knows its epoch and how far into it it is; Lightning-resumable.

    Args:
        stream: The training stream (already bound to a rank and world size).
        num_workers: DataLoader worker processes.
        epoch_fn: Called when an iteration starts; returns the epoch to stream (e.g. the trainer's
            `current_epoch`) or None to keep the epoch last given to `set_epoch`.
    """

    def __init__(
        self, stream: TrainStream, num_workers: int, epoch_fn: Callable[[], int | None] | None = None
    ):
        super().__init__(stream, num_workers)
        self.stream = stream
        self.epoch_fn = epoch_fn
        self.batches_seen = 0

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int) -> None:
        """Stream `epoch` on the next iteration (used when no trainer drives the epoch)."""
        self.stream.set_epoch(epoch)

    def set_resume_position(self, epoch: int, batches_seen: int) -> None:
        """The next iteration of `epoch` continues after `batches_seen` batches, with fresh samples."""
        self.stream.set_resume_position(epoch, batches_seen)

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        if epoch is not None:
            self.stream.set_epoch(epoch)
        # Set before the workers start (they read the position when their iteration begins).
        self.batches_seen = self.stream.batches_seen_at_start(self.stream.epoch)
        return self._counted(super().__iter__())

    def _counted(self, iterator: Iterator[dict]) -> Iterator[dict]:
        for batch in self._batches(iterator):
            self.batches_seen += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where training is: the epoch and the batches of it this rank has consumed."""
        return {"epoch": self.epoch, "batches_seen": self.batches_seen}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume inside the saved epoch (Lightning calls this when restarting from a mid-epoch checkpoint)."""
        self.set_resume_position(int(state_dict["epoch"]), int(state_dict["batches_seen"]))
