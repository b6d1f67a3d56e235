"""Tests of `RetrievalDataModule`: shards -> batches round trip, both shard layouts, source forms, skipped-sample
accounting, simulated ranks, argument checks, the built-in auto-build and a Lightning fit resumed mid-epoch.

    .venv/bin/pytest tests/test_datamodule.py -q            # add -m "not slow" for the fast tier only
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from mmret.data.datamodule import RetrievalDataModule
from mmret.data.samples import stable_sample_id
from mmret.errors import UsageError
from tests.shard_fixtures import caption_index, truncate, write_img2dataset_shards, write_shards


def dict_tokenizer(captions):
    """An HF-style tokenizer: a dict of [B, 6] tensors (module-level so workers can unpickle it)."""
    lengths = torch.tensor([min(len(text.split()), 6) for text in captions])
    positions = torch.arange(6)
    return {
        "input_ids": positions.expand(len(captions), 6) + 100,
        "attention_mask": (positions < lengths[:, None]).long(),
    }


def small_transform(image: Image.Image) -> torch.Tensor:
    """Resize to 16 px and scale to [0, 1]: [3, 16, 16]."""
    pixels = torch.tensor(list(image.resize((16, 16)).getdata()), dtype=torch.float32)  # [256, 3]
    return pixels.T.reshape(3, 16, 16) / 255


def all_batches(loader):
    return list(loader)


def ids(batches):
    return [i for batch in batches for i in batch["sample_id"].tolist()]


def test_round_trip_with_default_preprocessing(tmp_path):
    directory = write_shards(tmp_path / "toy", num_samples=24, samples_per_shard=10, captions_per_image=3)
    dm = RetrievalDataModule(train=str(directory), val=str(directory), batch_size=8, num_workers=0)
    dm.setup("fit")
    train = all_batches(dm.train_dataloader())
    assert len(train) == len(dm.train_dataloader()) == 24 // 8
    batch = train[0]
    assert set(batch) == {"image", "text", "sample_id", "label", "caption"}
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() < 0 < batch["image"].max()  # CLIP-normalised, not [0, 1]
    assert batch["text"].shape == (8, 77) and batch["text"].dtype == torch.long
    assert batch["sample_id"].dtype == batch["label"].dtype == torch.long
    assert batch["label"].tolist() == [i % 3 for i in batch["sample_id"].tolist()]
    assert [caption_index(text) for text in batch["caption"]] == batch["sample_id"].tolist()

    val = all_batches(dm.val_dataloader())
    assert sorted(ids(val)) == list(range(24))
    first = val[0]
    assert first["captions"][0] == [f"toy image {first['sample_id'][0]} caption {line}" for line in range(3)]
    assert first["caption"] == [captions[0] for captions in first["captions"]]
    assert first["metadata"][0]["id"] == first["sample_id"][0].item()
    assert dm.dataset_info("val")["class_names"] == ["zero", "one", "two"]


def test_val_fraction_carves_a_validation_split_the_training_stream_never_sees(tmp_path):
    directory = write_shards(tmp_path / "toy", num_samples=200, samples_per_shard=50)
    dm = RetrievalDataModule(
        train=str(directory), batch_size=10, num_workers=0, val_fraction=0.2, shuffle_buffer=8
    )
    dm.setup("fit")
    held = ids(all_batches(dm.val_dataloader()))
    assert len(held) == len(set(held)) and 25 <= len(held) <= 55, len(held)  # ~20 % of 200, by hash
    trained = set()
    for epoch in range(3):
        loader = dm.train_dataloader()
        loader.set_epoch(epoch)
        trained |= set(ids(all_batches(loader)))
    assert not trained & set(held)
    assert len(trained) > 100  # the rest is trained on (resampled shards: not every sample in 3 epochs)
    assert dm.num_train_batches() == round(200 * 0.8) // 10
    again = RetrievalDataModule(train=str(directory), batch_size=10, num_workers=0, val_fraction=0.2)
    again.setup("fit")
    assert ids(all_batches(again.val_dataloader())) == held  # the same split on every run
    given = RetrievalDataModule(train=str(directory), val=str(directory), batch_size=10, num_workers=0,
                                val_fraction=0.2)  # fmt: skip
    given.setup("fit")
    assert sorted(ids(all_batches(given.val_dataloader()))) == list(range(200))  # val given: nothing carved


def eval_transform(image: Image.Image) -> torch.Tensor:
    """Like small_transform, but 8 px, so tests can tell which transform ran: [3, 8, 8]."""
    return small_transform(image)[:, ::2, ::2]


def test_model_preprocessing_runs_in_workers_and_keeps_the_tokenizer_dict(tmp_path):
    directory = write_shards(tmp_path / "toy", num_samples=20, samples_per_shard=5)
    dm = RetrievalDataModule(train=str(directory), test=str(directory), batch_size=4, num_workers=2)
    dm.set_preprocess(small_transform, dict_tokenizer, eval_image_transform=eval_transform)
    dm.setup()
    train = all_batches(dm.train_dataloader())
    test = all_batches(dm.test_dataloader())
    assert len(train) == 5 and sum(len(batch["caption"]) for batch in test) == 20
    assert {batch["image"].shape[1:] for batch in train} == {(3, 16, 16)}
    assert {batch["image"].shape[1:] for batch in test} == {(3, 8, 8)}
    for batch in train + test:
        assert batch["image"].min() >= 0
        assert set(batch["text"]) == {"input_ids", "attention_mask"}
        assert (
            batch["text"]["input_ids"].shape
            == batch["text"]["attention_mask"].shape
            == (len(batch["caption"]), 6)
        )
        assert batch["text"]["attention_mask"][:, :4].all()  # "toy image N caption M" has 5 words


def test_img2dataset_directory_is_read_as_is(tmp_path):
    directory = write_img2dataset_shards(tmp_path / "web", num_samples=22, samples_per_shard=8)
    assert not (directory / "dataset.json").exists()
    dm = RetrievalDataModule(
        train=str(directory), val=str(directory), batch_size=4, num_workers=0, image_size=24
    )
    dm.setup("fit")
    assert dm.num_train_batches() == 22 // 4  # samples per epoch from the *_stats.json successes
    train = all_batches(dm.train_dataloader())
    assert train[0]["image"].shape == (4, 3, 24, 24) and (train[0]["label"] == -1).all()
    val = all_batches(dm.val_dataloader())
    expected = {
        stable_sample_id(f"{index // 8:05d}.tar", f"{index // 8:05d}{index % 8:04d}") for index in range(22)
    }
    assert len(ids(val)) == 22 and set(ids(val)) == expected
    assert val[0]["metadata"][0]["status"] == "success"


def test_brace_patterns_and_lists_of_directories(tmp_path):
    first = write_shards(tmp_path / "a", num_samples=30, samples_per_shard=10)
    second = write_shards(tmp_path / "b", num_samples=8, samples_per_shard=4, id_offset=1000)
    dm = RetrievalDataModule(
        train=[f"{first}/{{00000..00001}}.tar", str(second)],
        val=[f"{first}/{{00001..00002}}.tar", f"{second}/00001.tar"],
        batch_size=4,
        num_workers=0,
    )
    dm.setup("fit")
    assert dm.num_train_batches() == (20 + 8) // 4
    train_ids = set(ids(all_batches(dm.train_dataloader())))
    assert train_ids <= set(range(20)) | set(range(1000, 1008)) and train_ids & set(range(1000, 1008))
    assert sorted(ids(all_batches(dm.val_dataloader()))) == list(range(10, 30)) + list(range(1004, 1008))


def test_skipped_samples_are_counted_over_workers(tmp_path):
    corrupt = {1: "bad_image", 6: "truncated_image", 9: "missing_caption"}
    directory = write_shards(tmp_path / "bad", num_samples=20, samples_per_shard=5, corrupt=corrupt)
    write_shards(tmp_path / "cut", num_samples=10, samples_per_shard=10, id_offset=100)
    truncate(tmp_path / "cut" / "00000.tar", 0.55)
    dm = RetrievalDataModule(
        val=[str(directory), str(tmp_path / "cut" / "00000.tar")], batch_size=4, num_workers=2
    )
    dm.setup("validate")
    val_ids = ids(all_batches(dm.val_dataloader()))
    assert len(val_ids) == len(set(val_ids))
    cut_ids = set(val_ids) & set(range(100, 110))
    assert set(val_ids) - cut_ids == set(range(20)) - set(corrupt) and 0 < len(cut_ids) < 10
    counts = dm.skipped_counts("val")
    assert counts["bad_image"] == 2 and counts["missing_caption"] >= 1 and counts["truncated_shard"] == 1
    # Every sample of the cut shard is delivered or counted: lost ones as missing, and the last one read may
    # have lost its caption.
    assert len(cut_ids) + counts["missing_samples"] + counts["missing_caption"] - 1 == 10
    all_batches(dm.val_dataloader())  # a second pass adds to the totals
    assert dm.skipped_counts()["bad_image"] == 4


def test_simulated_ranks_split_eval_exactly_and_train_evenly(tmp_path):
    directory = write_shards(tmp_path / "toy", num_samples=30, samples_per_shard=10)
    per_rank = []
    for rank in range(2):
        dm = RetrievalDataModule(train=str(directory), val=str(directory), batch_size=3, num_workers=2)
        dm.trainer = SimpleNamespace(
            global_rank=rank, world_size=2, current_epoch=2
        )  # what Lightning provides
        dm.setup("fit")
        train = dm.train_dataloader()
        assert len(train) == 30 // (3 * 2) and len(all_batches(train)) == 5 and train.epoch == 2
        per_rank.append(ids(all_batches(dm.val_dataloader())))
    assert sorted(per_rank[0] + per_rank[1]) == list(range(30))


def test_train_epochs_differ_and_resume_position_draws_fresh_batches(tmp_path):
    directory = write_shards(tmp_path / "toy", num_samples=40, samples_per_shard=10)
    dm = RetrievalDataModule(train=str(directory), batch_size=4, num_workers=0, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epoch0 = ids(all_batches(loader))
    assert ids(all_batches(loader)) == epoch0 and loader.state_dict() == {"epoch": 0, "batches_seen": 10}
    loader.set_epoch(1)
    assert ids(all_batches(loader)) != epoch0
    dm.set_resume_position(epoch=0, batches_seen=6)
    loader.set_epoch(0)
    resumed = all_batches(loader)
    assert len(resumed) == 4 and ids(resumed) != epoch0[-16:]
    assert loader.state_dict() == {"epoch": 0, "batches_seen": 10}


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({}, "has no data"),
        ({"train": "x", "train_weights": [1, 2]}, "one weight per entry"),
        ({"train": "x", "batch_size": 0}, "batch_size is 0"),
        ({"dataset": "digits", "num_workers": -1}, "num_workers is -1"),
        ({"train": "x", "val_fraction": 1.0}, "val_fraction is 1.0"),
    ],
)
def test_conflicting_arguments_are_rejected_at_construction(kwargs, fragment):
    with pytest.raises(UsageError, match=fragment):
        RetrievalDataModule(**kwargs)


def test_unknown_epoch_size_and_oversized_batches_are_explained(tmp_path, monkeypatch):
    directory = write_img2dataset_shards(tmp_path / "web", num_samples=6, samples_per_shard=6)
    (directory / "00000_stats.json").unlink()

    # A shard without counts is counted from its tar headers, unless it cannot be opened.
    def unopenable(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr("mmret.data.shard_sets.count_shard_samples", unopenable)
    with pytest.raises(UsageError, match="set the data module's samples_per_epoch"):
        RetrievalDataModule(train=str(directory), num_workers=0).train_dataloader()
    dm = RetrievalDataModule(train=str(directory), num_workers=0, samples_per_epoch=6, batch_size=4)
    assert len(all_batches(dm.train_dataloader())) == 1
    with pytest.raises(UsageError, match="make no full batch"):
        RetrievalDataModule(train=str(directory), samples_per_epoch=6, batch_size=8).train_dataloader()
    with pytest.raises(UsageError, match="no val data"):
        RetrievalDataModule(train=str(directory))._required_sources("val")


@pytest.mark.slow
def test_builtin_dataset_is_built_once_when_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = RetrievalDataModule(dataset="digits", batch_size=16, num_workers=0)
    dm.prepare_data()
    info = json.loads((tmp_path / "data/digits/train/dataset.json").read_text())
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 3, info["image_size"], info["image_size"])
    assert len(dm.train_dataloader()) == info["num_samples"] // 16
    assert dm.dataset_info("test")["class_names"][3] == "three"
    stamp = (tmp_path / "data/digits/train/00000.tar").stat().st_mtime_ns
    RetrievalDataModule(dataset="digits").setup("fit")  # present: read, not rebuilt
    assert (tmp_path / "data/digits/train/00000.tar").stat().st_mtime_ns == stamp
    with pytest.raises(UsageError, match="unknown built-in dataset"):
        RetrievalDataModule(dataset="nope", data_root=str(tmp_path)).setup("fit")


class RecordingModule(L.LightningModule):
    """Records the sample ids of every training batch."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["sample_id"].tolist()))
        return self.layer(batch["image"].mean(dim=(2, 3))).mean()  # [B, 3] -> [B, 1] -> scalar

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(datamodule, tmp_path, max_epochs, ckpt_path=None, callbacks=()):
    module = RecordingModule()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.slow
def test_lightning_fit_streams_new_epochs_and_resumes_mid_epoch_with_fresh_samples(tmp_path):
    directory = write_shards(tmp_path / "toy", num_samples=40, samples_per_shard=10)

    def datamodule():
        return RetrievalDataModule(train=str(directory), batch_size=4, num_workers=2, shuffle_buffer=16)

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    first = fit(datamodule(), tmp_path, max_epochs=2, callbacks=[checkpoints])
    by_epoch = [[ids for epoch, ids in first if epoch == e] for e in range(2)]
    assert len(by_epoch[0]) == len(by_epoch[1]) == 10 and by_epoch[0] != by_epoch[1]

    checkpoint_path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(checkpoint_path, weights_only=False)["loops"]["fit_loop"]["state_dict"][
        "combined_loader"
    ]
    assert saved == [{"epoch": 0, "batches_seen": 4}]
    resumed = fit(datamodule(), tmp_path, max_epochs=1, ckpt_path=checkpoint_path)
    assert [epoch for epoch, _ in resumed] == [0] * 6  # only the rest of epoch 0
    assert [ids for _, ids in resumed] != by_epoch[0][4:]  # a fresh shuffle, not a replay
