"""`RetrievalDataModule`: the streaming LightningDataModule every mmret model trains and evaluates on.

It reads webdataset shards (ours or img2dataset's), mixes several training sources by weight, resamples
shards per (seed, epoch, rank, worker) so that ranks need no coordination, and gives validation / test
loaders that see every sample exactly once across ranks. Batches are dicts (README "Batches" and
`mmret.data.samples.collate_samples`): image [B, 3, H, W], text (tokens), sample_id [B], label [B], caption,
and for eval also captions, metadata, key.

In a config (LightningCLI):

    data:
      class_path: mmret.data.datamodule.RetrievalDataModule
      init_args: {dataset: digits, batch_size: 128}

In Python:

    dm = RetrievalDataModule(train=["/data/cc3m", "/data/laion/{00000..00099}.tar"], train_weights=[3, 1])
    dm.set_preprocess(image_transform, tokenizer)   # the model does this in its setup()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

Resuming: the train loader saves `{"epoch", "batches_seen"}` in Lightning checkpoints and continues a
mid-epoch resume with a fresh shuffle; outside Lightning call `set_resume_position(epoch, batches_seen)`.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L

from mmret.data.loaders import EvalLoader, TrainLoader
from mmret.data.mined_negatives import MinedNegativeStore
from mmret.data.perturb import CaptionPerturber
from mmret.data.shard_sets import ShardSource, resolve_sources, total_samples
from mmret.data.streams import EvalStream, Holdout, TrainStream
from mmret.data.twin_batches import TwinBatcher
from mmret.errors import UsageError

SPLITS = ("train", "val", "test")
DEFAULT_TOKENIZER_MODEL = "ViT-B-32"  # open_clip's bundled BPE vocabulary: works offline


def default_image_transform(image_size: int | Sequence[int] | None = None) -> Callable:
    """PIL RGB image -> normalised tensor [3, H, W]: resize + centre crop to `image_size` (when given),
    then CLIP's mean / std."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision import transforms

    steps: list = []
    if image_size:
        size = image_size if isinstance(image_size, int) else tuple(image_size)
        steps += [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
        ]
    steps += [transforms.ToTensor(), transforms.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)]
    return transforms.Compose(steps)


@functools.lru_cache(maxsize=4)
def default_tokenizer(context_length: int = 77) -> Callable:
    """open_clip's bundled BPE tokenizer (ViT-B-32 vocabulary): list of B captions -> LongTensor [B, L]."""
    import open_clip

    return open_clip.get_tokenizer(DEFAULT_TOKENIZER_MODEL, context_length=context_length)


class RetrievalDataModule(L.LightningDataModule):
    """Streams image-caption shards into retrieval batches for training, validation and test.

    Args:
        dataset: A built-in dataset name (e.g. `digits`, `shapes`): its splits are read from
            `<data_root>/<name>/{train,val,test}` and built there first (offline, deterministic) when missing.
        data_root: Where built-in datasets live, relative to the working directory.
        train: Training shards: a directory, a .tar, a glob, a brace pattern like `/x/{00000..00009}.tar`, or
            a list of those (each one a source to mix). Overrides the built-in dataset's train split.
        val: Validation shards, same forms (a list is read as one concatenated set). Overrides the built-in's.
        test: Test shards, same forms. Overrides the built-in's.
        train_weights: Relative weight of each train source when mixing, e.g. `[3, 1]`; default: by sample
            count, as if the sources were one dataset.
        batch_size: Training batch size per rank.
        eval_batch_size: Validation / test batch size per rank; default: `batch_size`.
        num_workers: DataLoader worker processes per loader; decoding, transforms and tokenisation run there.
        samples_per_epoch: Samples one epoch draws over all ranks; default: the training sources' sizes from
            `dataset.json` or img2dataset's `*_stats.json`. An epoch is `samples_per_epoch // (batch_size ×
            world_size)` batches on every rank.
        seed: Seed of the training stream: shard draws, mixing, shuffling and caption choice derive from
            (seed, epoch, rank, worker).
        image_size: Resize + centre-crop size of the default image transform; default: the `image_size` of
            the data's dataset.json, or no resizing. Ignored once a model sets its own transform.
        shuffle_buffer: Raw samples each training worker holds to shuffle across shard boundaries.
        context_length: Token length of the default tokenizer. Ignored once a model sets its own tokenizer.
        mined_negatives: A `mmret mine` output mined on the training shards: every training sample then also
            carries `mined_per_sample` of its mined negative images and captions (mmret.data.mined_negatives; the
            reranker, mmret.training.CrossEncoder, scores them beside its in-batch negatives).
        mined_per_sample: Mined negatives attached per sample and direction, drawn afresh each time.
        caption_negatives: Compositional negatives of each training caption made on the fly
            (mmret.data.perturb: attribute/object swaps and replacements, relation swaps, shuffles), carried in
            the batch as `perturbed_*`; the dual encoder adds them to its image->text denominators and the
            reranker scores them as image->text negatives. 0: none.
        perturbation_types: The strategies to draw from (names in mmret.data.perturb.PERTURBATION_TYPES);
            default: every one that applies to a caption.
        negatives_known_only: Draw only caption negatives that are themselves captions of training samples seen
            earlier in the epoch's stream, so no negative shows a composition the training data never does (for
            held-out-composition tests such as shapes' unseen part; see mmret.data.perturb).
        batch_twins: Twins per sample: each sample drawn into a training batch brings up to this many samples of
            the shuffle buffer that a perturbation of its caption describes (its bag-of-words twins, e.g. the
            same shapes with the colours swapped), so the in-batch negatives hold every sample's hardest
            confusers at no extra encoding cost (mmret.data.twin_batches). Uses `perturbation_types` and the
            word classes; a larger `shuffle_buffer` finds more twins. 0: plain shuffled batches.
        val_fraction: When no validation data is given (no `val`, no built-in dataset), hold out this fraction of
            the training samples (chosen by a hash of each sample's identity, the same on every run) as the
            validation split; training never sees them. 0: no validation unless `val` is given.
        word_classes: Word classes for the targeted strategies, `{name: {role, words}}` with role attribute,
            object or relation; added to (and overriding) the `word_classes` of the train data's dataset.json.
    """

    def __init__(
        self,
        dataset: str | None = None,
        data_root: str = "data",
        train: str | list[str] | None = None,
        val: str | list[str] | None = None,
        test: str | list[str] | None = None,
        train_weights: list[float] | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        image_size: int | None = None,
        shuffle_buffer: int = 1000,
        context_length: int = 77,
        mined_negatives: str | None = None,
        mined_per_sample: int = 4,
        caption_negatives: int = 0,
        perturbation_types: list[str] | None = None,
        word_classes: dict | None = None,
        negatives_known_only: bool = False,
        batch_twins: int = 0,
        val_fraction: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if dataset is None and train is None and val is None and test is None:
            raise UsageError(
                "the data module has no data: set `dataset` (a built-in name) or `train`/`val`/`test`"
            )
        for name, value, minimum in [
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("samples_per_epoch", samples_per_epoch, 1),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("context_length", context_length, 1),
            ("image_size", image_size, 1),
            ("mined_per_sample", mined_per_sample, 1),
            ("caption_negatives", caption_negatives, 0),
            ("batch_twins", batch_twins, 0),
        ]:
            if value is not None and value < minimum:
                raise UsageError(f"data module: {name} is {value}; expected an integer >= {minimum}")
        if not 0 <= val_fraction < 1:
            raise UsageError(f"data module: val_fraction is {val_fraction}; expected a number in [0, 1)")
        num_train_sources = len(train) if isinstance(train, (list, tuple)) else 1
        if train_weights is not None and len(train_weights) != num_train_sources:
            raise UsageError(
                f"data module: train_weights has {len(train_weights)} weight(s) for {num_train_sources} train "
                "source(s); give one weight per entry of `train`"
            )
        self.dataset = dataset
        self.data_root = data_root
        self.split_specs: dict[str, str | list[str] | None] = {"train": train, "val": val, "test": test}
        self.train_weights = train_weights
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.image_size = image_size
        self.shuffle_buffer = shuffle_buffer
        self.context_length = context_length
        self.mined_negatives = mined_negatives
        self.mined_per_sample = mined_per_sample
        self.caption_negatives = caption_negatives
        self.perturbation_types = perturbation_types
        self.word_classes = word_classes
        self.negatives_known_only = negatives_known_only
        self.batch_twins = batch_twins
        self.val_fraction = val_fraction
        if batch_twins and shuffle_buffer < 2:
            raise UsageError(
                f"data module: batch_twins is {batch_twins} but shuffle_buffer is {shuffle_buffer}; twins are "
                "looked for in the shuffle buffer, so it needs at least 2 samples (thousands find more twins)"
            )
        if caption_negatives or batch_twins:
            self._perturber_for(None)  # check the types and classes now: a bad one fails before training
        self._mined: MinedNegativeStore | None = None
        self.image_transform: Callable | None = None
        self.eval_image_transform: Callable | None = None
        self.tokenizer: Callable | None = None
        self._sources: dict[str, list[ShardSource]] = {}
        self._loaders: dict[str, list[TrainLoader | EvalLoader]] = {split: [] for split in SPLITS}
        self._resume: tuple[int, int] | None = None

    # ---- preprocessing -------------------------------------------------------------------------------------

    def set_preprocess(
        self,
        image_transform: Callable | None,
        tokenizer: Callable | None,
        eval_image_transform: Callable | None = None,
    ) -> None:
        """Use the model's preprocessing; call before the dataloaders are built (a model's `setup()` hook).

        Args:
            image_transform: PIL RGB image -> tensor [3, H, W] for training (may augment); None keeps the
                default.
            tokenizer: list of B captions -> LongTensor [B, L] or a dict of [B, L] tensors; None keeps the
                default.
            eval_image_transform: The deterministic transform for validation / test (open_clip's
                `preprocess_val`); None uses `image_transform` there too.
        """
        self.image_transform = image_transform
        self.eval_image_transform = eval_image_transform
        self.tokenizer = tokenizer

    def _preprocess(self, split: str) -> tuple[Callable, Callable]:
        image_transform = self.image_transform
        if split != "train" and self.eval_image_transform is not None:
            image_transform = self.eval_image_transform
        if image_transform is None:
            info = self.dataset_info(split) or {}
            image_transform = default_image_transform(self.image_size or info.get("image_size"))
        tokenizer = self.tokenizer or default_tokenizer(self.context_length)
        return image_transform, tokenizer

    # ---- data sources --------------------------------------------------------------------------------------

    @property
    def builtin_root(self) -> Path | None:
        """`<data_root>/<dataset>` for a built-in dataset, else None."""
        return Path(self.data_root) / self.dataset if self.dataset else None

    def _split_specs(self, split: str) -> list[str] | None:
        specs = self.split_specs[split]
        if specs is not None:
            return [str(spec) for spec in specs] if isinstance(specs, (list, tuple)) else [str(specs)]
        if self.builtin_root is not None:
            return [str(self.builtin_root / split)]
        return None

    def _builtin_missing(self) -> bool:
        return self.builtin_root is not None and any(
            self.split_specs[split] is None and not (self.builtin_root / split / "dataset.json").is_file()
            for split in SPLITS
        )

    def prepare_data(self) -> None:
        """Build the built-in dataset when its splits are missing (Lightning runs this once per node)."""
        if self._builtin_missing():
            from mmret.data.builtin import build_dataset  # lazy: only needed the first time

            build_dataset(self.dataset, self.builtin_root)

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard sources the stage needs (and build a built-in dataset if nobody did yet)."""
        self.prepare_data()  # a no-op once built; covers use without a Trainer
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", SPLITS)
        for split in splits:
            self.sources(split)
        if stage == "fit" and self.sources("train"):
            self.num_train_batches()  # its sample-count checks refuse here, before the fit counts as started

    def sources(self, split: str) -> list[ShardSource]:
        """The resolved shard sources of a split (empty when the split has no data)."""
        if split not in self._sources:
            if split == "val" and self.carves_val:
                self._sources[split] = self.sources("train")
            else:
                self._sources[split] = resolve_sources(self._split_specs(split), role=split)
        return self._sources[split]

    @property
    def carves_val(self) -> bool:
        """True when the validation split is `val_fraction` of the training samples (no val data given)."""
        return (
            bool(self.val_fraction)
            and self._split_specs("val") is None
            and self._split_specs("train") is not None
        )

    def _holdout(self, split: str) -> Holdout | None:
        if not self.carves_val or split not in ("train", "val"):
            return None
        return Holdout(self.val_fraction, keep=split == "val")

    def dataset_info(self, split: str = "test") -> dict | None:
        """The `dataset.json` of the split's first source (class names, templates, image size), if any."""
        sources = self.sources(split)
        return sources[0].info if sources else None

    def _rank_and_world(self) -> tuple[int, int]:
        # The trainer knows the process layout; without one (scripts, tests) this is a single process.
        if self.trainer is None:
            return 0, 1
        return int(self.trainer.global_rank), int(self.trainer.world_size)

    def _trainer_epoch(self) -> int | None:
        return None if self.trainer is None else int(self.trainer.current_epoch)

    # ---- loaders -------------------------------------------------------------------------------------------

    def num_train_batches(self, world_size: int | None = None) -> int:
        """Batches per rank in one training epoch."""
        world_size = world_size or self._rank_and_world()[1]
        sources = self._required_sources("train")
        samples = self.samples_per_epoch or total_samples(sources)
        if samples is None:
            raise UsageError(
                f"train data {[source.spec for source in sources]}: the number of samples is unknown (no "
                "dataset.json shard sizes or *_stats.json, and a shard could not be opened to count it); set "
                "the data module's samples_per_epoch"
            )
        if self.carves_val and not self.samples_per_epoch:
            samples = round(samples * (1 - self.val_fraction))  # about what stays for training
        batches = samples // (self.batch_size * world_size)
        if batches < 1:
            raise UsageError(
                f"data module: {samples} samples per epoch make no full batch of {self.batch_size} on each of "
                f"{world_size} rank(s); lower batch_size or raise samples_per_epoch"
            )
        return batches

    def _required_sources(self, split: str) -> list[ShardSource]:
        sources = self.sources(split)
        if not sources:
            raise UsageError(f"data module: no {split} data; set `{split}` or a built-in `dataset`")
        return sources

    def train_dataloader(self) -> TrainLoader:
        """Resampled, mixed, shuffled training batches; `num_train_batches()` of them per epoch and rank."""
        sources = self._required_sources("train")
        rank, world_size = self._rank_and_world()
        image_transform, tokenizer = self._preprocess("train")
        stream = TrainStream(
            sources,
            batch_size=self.batch_size,
            batches_per_rank=self.num_train_batches(world_size),
            image_transform=image_transform,
            tokenizer=tokenizer,
            weights=self.train_weights,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            mined=self._mined_store(sources),
            perturber=self._perturber_for(sources) if self.caption_negatives else None,
            caption_negatives=self.caption_negatives,
            negatives_known_only=self.negatives_known_only,
            twins=(
                TwinBatcher(self._perturber_for(sources), self.batch_twins, self.shuffle_buffer)
                if self.batch_twins
                else None
            ),
        )
        # Lightning warns that an IterableDataset's __len__ may be wrong with several workers; ours is exact by
        # construction (each worker yields its share of batches_per_rank), so that warning is noise here.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        stream.holdout = self._holdout("train")
        loader = TrainLoader(stream, num_workers=self.num_workers, epoch_fn=self._trainer_epoch)
        if self._resume is not None:
            loader.set_resume_position(*self._resume)
        self._loaders["train"].append(loader)
        return loader

    def _perturber_for(self, sources: list[ShardSource] | None) -> CaptionPerturber:
        """The caption perturber of the train data: word classes of its dataset.json files plus `word_classes`."""
        declared: dict = {}
        for source in sources or []:
            declared.update((source.info or {}).get("word_classes") or {})
        try:
            return CaptionPerturber.for_dataset(
                {"word_classes": declared}, self.word_classes, self.perturbation_types
            )
        except UsageError as err:
            raise UsageError(f"data module: {err}") from None

    def _mined_store(self, sources: list[ShardSource]) -> MinedNegativeStore | None:
        if self.mined_negatives is None:
            return None
        if self._mined is None:
            shards = [shard for source in sources for shard in source.shards]
            self._mined = MinedNegativeStore(self.mined_negatives, shards, self.mined_per_sample)
        return self._mined

    def _eval_dataloader(self, split: str) -> EvalLoader | list:
        sources = self.sources(split)
        if not sources:
            return []  # Lightning reads an empty list as "no loader for this stage"
        rank, world_size = self._rank_and_world()
        image_transform, tokenizer = self._preprocess(split)
        stream = EvalStream(
            sources,
            batch_size=self.eval_batch_size,
            image_transform=image_transform,
            tokenizer=tokenizer,
            rank=rank,
            world_size=world_size,
        )
        stream.holdout = self._holdout(split)
        loader = EvalLoader(stream, num_workers=self.num_workers)
        self._loaders[split].append(loader)
        return loader

    def val_dataloader(self) -> EvalLoader | list:
        """Each validation sample exactly once over all ranks and workers, in a stable order."""
        return self._eval_dataloader("val")

    def test_dataloader(self) -> EvalLoader | list:
        """Each test sample exactly once over all ranks and workers, in a stable order."""
        return self._eval_dataloader("test")

    # ---- epoch, resume and accounting ----------------------------------------------------------------------

    def set_resume_position(self, epoch: int, batches_seen: int) -> None:
        """Continue `epoch` after `batches_seen` batches (per rank): the rest of that epoch is drawn from a
        fresh shuffle seeded with (seed, epoch, rank, worker, batches_seen), so no sample stream is replayed.

        Lightning does this by itself when it resumes from a mid-epoch checkpoint (the train loader is
        stateful); call it when driving the loop by hand. Applies to the current and future train loaders.
        """
        self._resume = (epoch, batches_seen)
        for loader in self._loaders["train"]:
            loader.set_resume_position(epoch, batches_seen)

    def skipped_counts(self, split: str | None = None) -> dict[str, int]:
        """Samples skipped as broken so far, by reason, summed over the workers of this rank's loaders.

        Args:
            split: "train", "val" or "test"; None sums all of them.
        """
        total: Counter[str] = Counter()
        for name in SPLITS if split is None else (split,):
            for loader in self._loaders[name]:
                total.update(loader.skipped)
        return dict(sorted(total.items()))
