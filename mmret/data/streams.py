"""Iterable datasets that turn shard sources into batches: a resampled, mixed training stream and an exact-once
evaluation stream. Both yield whole batches (collated in the DataLoader worker, tokenizer included).

Rank and world size are passed in explicitly (the data module reads them from the Lightning trainer), the
worker id comes from `torch.utils.data.get_worker_info()`; no process group is needed, so tests can simulate
any (rank, world size, workers) layout.

Training (`TrainStream`): every (seed, epoch, rank, worker) gets its own numpy generator, which draws shards
with replacement (weighted by their sizes), mixes sources by weight sample by sample, shuffles through a
buffer of raw samples and picks one caption per image. Each rank yields exactly `batches_per_rank` batches per
epoch, split across workers; no coordination between ranks is needed and runs are reproducible.
`set_resume_position(epoch, batches_seen)` makes that epoch yield only the remaining batches, from a stream
seeded with `batches_seen` as well, so a resumed run sees fresh samples instead of replaying the first ones.

Evaluation (`EvalStream`): shards are split by rank, then by worker; when there are fewer shards than
(rank, worker) slots, the slots that share a shard take its samples by index modulo. Every sample is read
exactly once across all ranks and workers, in a stable order, with its sample id.

    stream = TrainStream(sources, batch_size=64, batches_per_rank=100, image_transform=tf, tokenizer=tok)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mmret.data.mined_negatives import MinedNegativeStore, collate_mined
from mmret.data.perturb import (
    CaptionPerturber,
    caption_key_rows,
    caption_keys_of,
    collate_perturbed,
    normalize,
)
from mmret.data.samples import (
    SKIPPED_KEY,
    SkipCounter,
    SkippedSample,
    collate_samples,
    decode_sample,
    iter_shard,
)
from mmret.data.shard_sets import ShardSource
from mmret.data.twin_batches import TwinBatcher
from mmret.errors import UsageError

ImageTransform = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], Any]


@dataclass(frozen=True)
class Holdout:
    """A fixed share of a shard set's samples, chosen by a hash of each sample's identity: the validation split
    a data module carves from its training data when none is given. The train stream reads the samples outside
    it (`keep=False`), the validation stream those inside (`keep=True`); the two never share a sample, on every
    machine and run."""

    fraction: float
    keep: bool

    def admits(self, sample_id: int) -> bool:
        digest = hashlib.blake2b(f"holdout/{sample_id}".encode(), digest_size=8).digest()
        inside = int.from_bytes(digest, "big") / 2**64 < self.fraction
        return inside == self.keep


def _worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this code; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def worker_share(total: int, worker: int, num_workers: int) -> int:
    """How many of `total` items worker `worker` takes; the first `total % num_workers` workers take one more."""
    return total // num_workers + (1 if worker < total % num_workers else 0)


def eval_shard_plan(
    num_shards: int, rank: int, world_size: int, worker: int, num_workers: int
) -> list[tuple[int, int, int]]:
    """The shards one (rank, worker) slot reads, as (shard index, modulo, remainder) triples.

    The slot keeps the samples whose index within the shard satisfies `index % modulo == remainder`. Over all
    slots every sample of every shard is kept exactly once.
    """
    num_slots = world_size * num_workers
    if num_shards >= num_slots:
        # Whole shards: rank r takes shards r, r + world_size, ...; its workers split those in turn.
        rank_shards = list(range(rank, num_shards, world_size))
        return [(shard, 1, 0) for shard in rank_shards[worker::num_workers]]
    # Fewer shards than slots: slot s reads shard s % num_shards together with the other slots mapped to it.
    slot = rank * num_workers + worker
    shard = slot % num_shards
    modulo = len(range(shard, num_slots, num_shards))
    return [(shard, modulo, slot // num_shards)]


class _StreamBase(IterableDataset):
    """What both streams share: preprocessing in the worker and skip accounting."""

    def __init__(
        self,
        sources: Sequence[ShardSource],
        batch_size: int,
        rank: int,
        world_size: int,
        image_transform: ImageTransform,
        tokenizer: Tokenizer,
    ):
        if not sources:
            raise UsageError("a data stream needs at least one shard source")
        if batch_size < 1:
            raise UsageError(f"batch_size is {batch_size}; expected a positive integer")
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside world size {world_size}")
        self.sources = list(sources)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.holdout: Holdout | None = None  # set by the data module to carve a validation split

    def _prepare(self, raw: dict, counter: SkipCounter, caption_index: Callable[[int], int]) -> dict | None:
        """Decode and transform one raw sample; None (counted) when it is broken."""
        try:
            sample = decode_sample(raw)
        except SkippedSample as skipped:
            counter.add(skipped.reason, f"{raw['__shard__']}/{raw['__key__']}", skipped.detail)
            return None
        if self.holdout is not None and not self.holdout.admits(sample["sample_id"]):
            return None  # the other split's sample: not a skip
        sample["image"] = self.image_transform(sample["image"])  # [3, H, W]
        sample["caption"] = sample["captions"][caption_index(len(sample["captions"]))]
        return sample


class TrainStream(_StreamBase):
    """Endless, resampled, mixed, shuffled training batches; one epoch = `batches_per_rank` batches per rank.

    Args:
        sources: Shard sources to mix.
        batch_size: Samples per batch (per rank).
        batches_per_rank: Batches one rank yields per epoch, split across its DataLoader workers.
        weights: Relative sampling weight of each source; None weighs them by their sample counts (or shard
            counts when sizes are unknown), i.e. like one concatenated dataset.
        rank: This process's global rank.
        world_size: Number of ranks.
        seed: Base seed; the stream of (epoch, rank, worker) is a pure function of it.
        shuffle_buffer: Raw samples held for shuffling per worker (raw JPEG bytes, so cheap to hold).
        image_transform: PIL RGB image -> tensor [3, H, W].
        tokenizer: list of B captions -> LongTensor [B, L] or a dict of tensors.
        mined: Offline hard negatives (`mmret mine`) to attach to every sample (see mmret.data.mined_negatives).
        perturber: Makes `caption_negatives` compositional negatives of each sample's caption, on the fly
            (mmret.data.perturb); the batch then carries the `perturbed_*` fields.
        caption_negatives: Perturbed captions per sample (0: none).
        negatives_known_only: Draw only perturbations that are captions of samples this worker has already
            prepared in the epoch (the current batch included); see mmret.data.perturb, "Known-only negatives".
        twins: Groups each sample with the samples its caption's perturbations describe, drawn from the shuffle
            buffer into the same batch (mmret.data.twin_batches); replaces the plain shuffle.

    Whenever a batch carries hard negatives or twins it also carries `caption_keys` `[B, C]`, the keys of every
    caption of each sample, and `text_key` `[B]`, the key of each row's caption (mined captions carry
    `mined_text_key`), so a loss can tell a negative that happens to describe another image of the batch.
    """

    def __init__(
        self,
        sources: Sequence[ShardSource],
        *,
        batch_size: int,
        batches_per_rank: int,
        image_transform: ImageTransform,
        tokenizer: Tokenizer,
        weights: Sequence[float] | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        mined: MinedNegativeStore | None = None,
        perturber: CaptionPerturber | None = None,
        caption_negatives: int = 0,
        negatives_known_only: bool = False,
        twins: TwinBatcher | None = None,
    ):
        super().__init__(sources, batch_size, rank, world_size, image_transform, tokenizer)
        self.negatives_known_only = negatives_known_only
        self.twins = twins
        self.mined = mined
        if caption_negatives < 0 or (caption_negatives and perturber is None):
            raise UsageError(
                f"caption_negatives is {caption_negatives}; expected >= 0, with a perturber when > 0"
            )
        self.perturber = perturber if caption_negatives else None
        self.caption_negatives = caption_negatives
        if weights is None:
            counts = [source.num_samples for source in self.sources]
            weights = counts if all(counts) else [len(source.shards) for source in self.sources]
        if len(weights) != len(self.sources) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise UsageError(
                f"train weights {list(weights)} do not fit {len(self.sources)} train source(s); expected one "
                "non-negative weight per source, not all zero"
            )
        self.weights = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.batches_per_rank = batches_per_rank
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        # Set in the main process before each `iter()`; workers are started per iteration, so they get a copy.
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches seen before the restart)

    def __len__(self) -> int:
        """Batches per rank in a full epoch (also during a resumed epoch, which yields only the rest)."""
        return self.batches_per_rank

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration streams (its seeds derive from it)."""
        self.epoch = int(epoch)

    def set_resume_position(self, epoch: int, batches_seen: int) -> None:
        """Make `epoch` yield only its last `batches_per_rank - batches_seen` batches, freshly shuffled."""
        self._resume = (int(epoch), max(0, int(batches_seen)))

    def batches_seen_at_start(self, epoch: int) -> int:
        """Batches of `epoch` already consumed before this iteration (non-zero only for a resumed epoch)."""
        return self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0

    def _generator(self, epoch: int, worker: int, batches_seen: int) -> np.random.Generator:
        # batches_seen joins the seed: a resumed epoch draws a new stream rather than replaying its start.
        entropy = [self.seed % 2**63, epoch, self.rank, worker, batches_seen]
        return np.random.default_rng(np.random.SeedSequence(entropy))

    def _resampled(
        self, source: ShardSource, rng: np.random.Generator, counter: SkipCounter
    ) -> Iterator[dict]:
        """Raw samples of shards drawn with replacement, forever; bigger shards are drawn more often."""
        sizes = source.shard_sizes
        known = all(size is not None for size in sizes) and sum(sizes) > 0
        probabilities = np.asarray(sizes, dtype=np.float64) / sum(sizes) if known else None
        empty_reads = 0
        while True:
            index = int(rng.choice(len(source.shards), p=probabilities))
            read = 0
            for raw in iter_shard(source.shards[index], counter, expected=sizes[index]):
                read += 1
                yield raw
            empty_reads = 0 if read else empty_reads + 1
            if empty_reads > 2 * len(source.shards) + 8:
                raise UsageError(
                    f"train data {source.spec!r}: no sample could be read from {empty_reads} shards in a row; "
                    "expected readable webdataset tar shards"
                )

    def _mixed(self, rng: np.random.Generator, counter: SkipCounter) -> Iterator[dict]:
        streams = [self._resampled(source, rng, counter) for source in self.sources]
        if len(streams) == 1:
            yield from streams[0]
            return
        while True:
            yield next(streams[int(rng.choice(len(streams), p=self.weights))])

    def _shuffled(self, stream: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        """Shuffle an endless stream through a buffer: each new sample takes the place of a random one."""
        buffer: list[dict] = []
        for raw in stream:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(raw)
                continue
            index = int(rng.integers(len(buffer)))
            yield buffer[index]
            buffer[index] = raw

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker_slot()
        epoch = self.epoch
        batches_seen = self.batches_seen_at_start(epoch)
        remaining = max(0, self.batches_per_rank - batches_seen)
        num_batches = worker_share(remaining, worker, num_workers)
        rng = self._generator(epoch, worker, batches_seen)
        if get_worker_info() is not None:
            # Random augmentations in the transform draw from torch's RNG: make them reproducible too (only in
            # a worker process: reseeding the main process would disturb the model's own randomness).
            torch.manual_seed(int(rng.integers(2**63)))
        counter = SkipCounter()
        raw_stream = self._mixed(rng, counter)
        if self.twins is not None:
            raw_stream = self.twins.stream(raw_stream, rng, self.batch_size)
        elif self.shuffle_buffer > 1:
            raw_stream = self._shuffled(raw_stream, rng)
        # Normalized captions of every sample prepared so far (known-only negatives): the stream is a pure
        # function of (epoch, worker, position), so this set is too.
        known: set[str] | None = set() if self.negatives_known_only and self.perturber is not None else None
        for _ in range(num_batches):
            samples: list[dict] = []
            while len(samples) < self.batch_size:
                sample = self._prepare(next(raw_stream), counter, lambda n: int(rng.integers(n)))
                if sample is not None:
                    if self.mined is not None:
                        self.mined.attach(sample, rng, self.image_transform)
                    samples.append(sample)
            if self.perturber is not None:
                if known is not None:
                    known.update(normalize(c) for sample in samples for c in sample["captions"])
                for sample in samples:
                    sample["perturbed"] = self.perturber.sample(
                        sample["caption"], sample["captions"], rng, self.caption_negatives, known
                    )
            batch = collate_samples(samples, self.tokenizer, with_eval_fields=False)
            if self.mined is not None:
                batch.update(collate_mined(samples, self.tokenizer, self.mined.per_sample))
                batch["mined_text_key"] = caption_keys_of(batch["mined_caption"])
            if self.perturber is not None:
                batch.update(collate_perturbed(samples, self.tokenizer, self.caption_negatives))
            if self.mined is not None or self.perturber is not None or self.twins is not None:
                batch["caption_keys"] = caption_key_rows([sample["captions"] for sample in samples])
                batch["text_key"] = caption_keys_of([[caption] for caption in batch["caption"]])[:, 0]
            batch[SKIPPED_KEY] = counter.take_unreported()
            yield batch


class EvalStream(_StreamBase):
    """Every sample exactly once across ranks and workers, in a stable order; the last batch may be short.

    Args:
        sources: Shard sources, read one after the other.
        batch_size: Samples per batch.
        rank: This process's global rank.
        world_size: Number of ranks.
        image_transform: PIL RGB image -> tensor [3, H, W].
        tokenizer: list of B captions -> LongTensor [B, L] or a dict of tensors (applied to the first caption).
    """

    def __init__(
        self,
        sources: Sequence[ShardSource],
        *,
        batch_size: int,
        image_transform: ImageTransform,
        tokenizer: Tokenizer,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(sources, batch_size, rank, world_size, image_transform, tokenizer)
        self.shards = [shard for source in self.sources for shard in source.shards]
        self.shard_sizes = [size for source in self.sources for size in source.shard_sizes]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker_slot()
        plan = eval_shard_plan(len(self.shards), self.rank, self.world_size, worker, num_workers)
        counter = SkipCounter()
        samples: list[dict] = []
        for shard_index, modulo, remainder in plan:
            # Of the slots sharing a shard, only the first counts shard-level losses (truncation, missing
            # samples), so they are counted once; each slot counts the broken samples it keeps.
            shard_counter = counter if remainder == 0 else SkipCounter()
            expected = self.shard_sizes[shard_index]
            for index, raw in enumerate(
                iter_shard(self.shards[shard_index], shard_counter, expected=expected)
            ):
                if index % modulo != remainder:
                    continue
                sample = self._prepare(raw, counter, lambda n: 0)  # eval: always the first caption
                if sample is None:
                    continue
                samples.append(sample)
                if len(samples) == self.batch_size:
                    yield self._batch(samples, counter)
                    samples = []
        if samples:
            yield self._batch(samples, counter)
        leftover = counter.take_unreported()
        if leftover:
            yield {SKIPPED_KEY: leftover}  # skips after the last batch; the loader counts and drops this item

    def _batch(self, samples: list[dict], counter: SkipCounter) -> dict[str, Any]:
        batch = collate_samples(samples, self.tokenizer, with_eval_fields=True)
        batch[SKIPPED_KEY] = counter.take_unreported()
        return batch
