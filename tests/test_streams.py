"""Tests of the shard streams below the data module: source resolution, tar reading and decoding, the
exact-once evaluation split, the resampled / mixed training stream, resume and corrupt-input accounting.

    .venv/bin/pytest tests/test_streams.py -q
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from mmret.data.samples import (
    SKIPPED_KEY,
    SkipCounter,
    SkippedSample,
    decode_sample,
    iter_shard,
    stable_sample_id,
)
from mmret.data.shard_sets import resolve_source, resolve_sources, total_samples
from mmret.data.streams import EvalStream, TrainStream, eval_shard_plan, worker_share
from mmret.errors import UsageError
from tests.shard_fixtures import (
    caption_index,
    cut_inside_member,
    truncate,
    write_img2dataset_shards,
    write_shards,
)


def image_to_tensor(image):
    """A cheap transform: [3, H, W] floats (module-level so DataLoader workers can use it)."""
    return torch.from_numpy(__import__("numpy").asarray(image).copy()).permute(2, 0, 1).float() / 255


def length_tokenizer(captions):
    """A stand-in tokenizer: [B, 2] of (caption length, sample index)."""
    return torch.tensor([[len(text), caption_index(text)] for text in captions])


def iterate(stream, num_workers=0):
    return list(DataLoader(stream, batch_size=None, num_workers=num_workers))


def ids_of(batches):
    return [i for batch in batches if "sample_id" in batch for i in batch["sample_id"].tolist()]


# ---- sources -----------------------------------------------------------------------------------------------


def test_sources_from_directory_brace_glob_and_single_tar(tmp_path):
    directory = write_shards(tmp_path / "ours", num_samples=25, samples_per_shard=10)
    whole = resolve_source(directory)
    assert [s.rsplit("/", 1)[1] for s in whole.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert whole.shard_sizes == (10, 10, 5) and whole.num_samples == 25
    assert whole.info["class_names"] == ["zero", "one", "two"]
    # A brace pattern over part of the shards still finds their sizes in the directory's dataset.json.
    part = resolve_source(f"{directory}/{{00001..00002}}.tar")
    assert part.shard_sizes == (10, 5)
    assert resolve_source(f"{directory}/0000[02].tar").shard_sizes == (10, 5)
    assert resolve_source(directory / "00000.tar").num_samples == 10
    both = resolve_sources([str(directory), f"{directory}/{{00000..00001}}.tar"], role="train")
    assert total_samples(both) == 45


def test_img2dataset_directory_sizes_come_from_stats(tmp_path):
    directory = write_img2dataset_shards(tmp_path / "web", num_samples=13, samples_per_shard=5)
    source = resolve_source(directory)
    assert source.info is None and source.shard_sizes == (5, 5, 3)
    (directory / "00002_stats.json").unlink()  # that shard is counted from its tar headers instead
    assert resolve_source(directory).shard_sizes == (5, 5, 3)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("missing_dir", "does not exist"),
        ("empty", "no *.tar"),
        ("x/{00000..00003}.tar", "does not exist"),
        ("nothing*.tar", "matches no file"),
        ("s3://bucket/{0..3}.tar", "remote"),
    ],
)
def test_bad_source_specs_raise_one_clear_usage_error(tmp_path, monkeypatch, spec, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="train data") as error:
        resolve_sources(spec, role="train")
    assert fragment in str(error.value)


# ---- reading and decoding ----------------------------------------------------------------------------------


def test_decode_sample_reads_every_field(tmp_path):
    directory = write_shards(tmp_path / "d", num_samples=4, samples_per_shard=4, captions_per_image=3)
    raws = list(iter_shard(str(directory / "00000.tar"), SkipCounter(), expected=4))
    sample = decode_sample(raws[2])
    assert sample["captions"] == [f"toy image 2 caption {line}" for line in range(3)]
    assert (sample["sample_id"], sample["label"], sample["key"]) == (2, 2, "000002")
    assert sample["image"].mode == "RGB" and sample["image"].size == (32, 32)
    web = write_img2dataset_shards(tmp_path / "w", num_samples=2, samples_per_shard=2)
    raw = next(iter_shard(str(web / "00000.tar"), SkipCounter()))
    decoded = decode_sample(raw)
    assert decoded["label"] == -1 and decoded["metadata"]["key"] == "000000000"
    assert decoded["sample_id"] == stable_sample_id("00000.tar", "000000000") < 2**63
    assert stable_sample_id("00000.tar", "000000001") != decoded["sample_id"]


def test_truncated_tar_keeps_complete_samples_and_counts_the_loss(tmp_path):
    directory = write_shards(tmp_path / "d", num_samples=10, samples_per_shard=10)
    truncate(directory / "00000.tar", 0.55)
    counter = SkipCounter()
    raws = list(iter_shard(str(directory / "00000.tar"), counter, expected=10))
    assert 0 < len(raws) < 10
    complete = [raw for raw in raws if {"jpg", "txt", "json", "cls"} <= raw.keys()]
    assert [raw["__key__"] for raw in complete] == [f"{i:06d}" for i in range(len(complete))]
    assert counter.totals["truncated_shard"] == 1
    assert counter.totals["missing_samples"] == 10 - len(raws)
    assert counter.take_unreported() == dict(counter.totals) and counter.take_unreported() == {}


@pytest.mark.parametrize(
    "kind, reason",
    [("bad_image", "bad_image"), ("truncated_image", "bad_image"), ("missing_caption", "missing_caption")],
)
def test_broken_samples_raise_skipped_with_reason(tmp_path, kind, reason):
    directory = write_shards(tmp_path / "d", num_samples=2, samples_per_shard=2, corrupt={1: kind})
    raws = list(iter_shard(str(directory / "00000.tar"), SkipCounter()))
    decode_sample(raws[0])
    with pytest.raises(SkippedSample) as skipped:
        decode_sample(raws[1])
    assert skipped.value.reason == reason


# ---- evaluation: exactly once ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_shards", range(1, 10))
def test_eval_plan_covers_every_sample_exactly_once(num_shards):
    shard_size = 7
    for world_size, num_workers in itertools.product((1, 2, 3), (1, 2, 3)):
        seen = Counter()
        for rank, worker in itertools.product(range(world_size), range(num_workers)):
            for shard, modulo, remainder in eval_shard_plan(
                num_shards, rank, world_size, worker, num_workers
            ):
                seen.update((shard, i) for i in range(shard_size) if i % modulo == remainder)
        assert seen == Counter({(s, i): 1 for s in range(num_shards) for i in range(shard_size)})


@pytest.mark.parametrize("num_shards", [3, 6])  # fewer and more shards than 2 ranks x 2 workers
def test_eval_stream_two_ranks_two_workers_yield_each_sample_once_in_stable_order(tmp_path, num_shards):
    directory = write_shards(tmp_path / "d", num_samples=num_shards * 5, samples_per_shard=5)
    source = resolve_source(directory)
    per_rank = []
    for rank in range(2):
        stream = EvalStream(
            [source],
            batch_size=4,
            image_transform=image_to_tensor,
            tokenizer=length_tokenizer,
            rank=rank,
            world_size=2,
        )
        batches = iterate(stream, num_workers=2)
        assert ids_of(batches) == ids_of(iterate(stream, num_workers=2))  # stable order
        for batch in batches:
            assert batch["caption"] == [captions[0] for captions in batch["captions"]]
            assert batch["text"][:, 1].tolist() == batch["sample_id"].tolist()
        per_rank.append(ids_of(batches))
    assert per_rank[0] and per_rank[1]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(num_shards * 5))


def test_shard_shared_by_slots_counts_its_truncation_once(tmp_path):
    directory = write_shards(tmp_path / "d", num_samples=12, samples_per_shard=12)
    cut_inside_member(directory / "00000.tar", "000007.jpg")
    source = resolve_source(directory)
    skipped, delivered = Counter(), []
    for rank in range(2):  # 1 shard, 2 ranks x 2 workers: four slots read it, each keeps every fourth sample
        stream = EvalStream(
            [source],
            batch_size=4,
            image_transform=image_to_tensor,
            tokenizer=length_tokenizer,
            rank=rank,
            world_size=2,
        )
        batches = iterate(stream, num_workers=2)
        for batch in batches:
            skipped.update(batch[SKIPPED_KEY])
        delivered += ids_of(batches)
    assert sorted(delivered) == list(range(7))  # samples 7.. are lost with the rest of the shard
    assert skipped == {"truncated_shard": 1, "missing_samples": 5}


# ---- training: resampled, mixed, reproducible --------------------------------------------------------------


def make_train_stream(sources, **overrides):
    options = dict(
        batch_size=4,
        batches_per_rank=5,
        image_transform=image_to_tensor,
        tokenizer=length_tokenizer,
        shuffle_buffer=8,
    )
    options.update(overrides)
    return TrainStream(sources, **options)


def test_worker_share_splits_batches_without_loss():
    for total, workers in itertools.product(range(12), range(1, 5)):
        shares = [worker_share(total, w, workers) for w in range(workers)]
        assert sum(shares) == total and max(shares) - min(shares) <= 1


def test_train_stream_fixed_batches_per_rank_and_reproducible(tmp_path):
    source = resolve_source(write_shards(tmp_path / "d", num_samples=40, samples_per_shard=10))
    stream = make_train_stream([source])
    with_workers = iterate(stream, num_workers=2)
    assert len(with_workers) == len(stream) == 5
    assert all(batch["image"].shape == (4, 3, 32, 32) for batch in with_workers)
    assert ids_of(iterate(stream, num_workers=2)) == ids_of(with_workers)
    for batch in with_workers:  # the drawn caption belongs to the image it is paired with
        assert [caption_index(text) for text in batch["caption"]] == batch["sample_id"].tolist()

    single = ids_of(iterate(stream))
    assert single == ids_of(iterate(make_train_stream([source])))  # same seed, same stream
    assert single != ids_of(iterate(make_train_stream([source], seed=1)))
    assert single != ids_of(iterate(make_train_stream([source], rank=1, world_size=2)))
    stream.set_epoch(1)
    assert single != ids_of(iterate(stream))
    captions = [
        text
        for batch in iterate(make_train_stream([source], batches_per_rank=30))
        for text in batch["caption"]
    ]
    assert {text.rsplit(" ", 1)[1] for text in captions} == {"0", "1"}  # both captions get drawn


def test_resumed_epoch_yields_only_the_rest_with_a_fresh_shuffle(tmp_path):
    source = resolve_source(write_shards(tmp_path / "d", num_samples=40, samples_per_shard=10))
    stream = make_train_stream([source], batches_per_rank=6)
    full = iterate(stream)
    stream.set_resume_position(epoch=0, batches_seen=2)
    resumed = iterate(stream)
    assert len(resumed) == 4
    assert ids_of(resumed) != ids_of(full[2:]) and ids_of(resumed)[:4] != ids_of(full)[:4]
    stream.set_epoch(1)  # the resume position belongs to epoch 0 only
    assert len(iterate(stream)) == 6


@pytest.mark.parametrize("weights, expected_first", [([3, 1], 0.75), ([1, 3], 0.25), (None, 0.75)])
def test_weighted_mixing_proportions(tmp_path, weights, expected_first):
    first = resolve_source(write_shards(tmp_path / "a", num_samples=30, samples_per_shard=10, image_size=8))
    second = resolve_source(
        write_shards(tmp_path / "b", num_samples=10, samples_per_shard=5, image_size=8, id_offset=10_000)
    )
    stream = make_train_stream(
        [first, second], weights=weights, batch_size=50, batches_per_rank=16, shuffle_buffer=100
    )
    ids = ids_of(iterate(stream))
    assert len(ids) == 800
    fraction = sum(i < 10_000 for i in ids) / len(ids)
    assert abs(fraction - expected_first) < 0.05  # binomial std at n=800 is 0.015
    # Shards are drawn in proportion to their sizes: the 5-sample shards of `second` are not over-drawn.
    second_ids = Counter(i - 10_000 for i in ids if i >= 10_000)
    assert len(second_ids) == 10


def test_train_stream_skips_and_reports_broken_samples(tmp_path):
    corrupt = {0: "bad_image", 1: "missing_caption", 2: "truncated_image"}
    source = resolve_source(write_shards(tmp_path / "d", num_samples=6, samples_per_shard=3, corrupt=corrupt))
    batches = iterate(make_train_stream([source], batch_size=3, batches_per_rank=6, shuffle_buffer=2))
    assert set(ids_of(batches)) == {3, 4, 5}
    skipped = Counter()
    for batch in batches:
        skipped.update(batch[SKIPPED_KEY])
    assert set(skipped) == {"bad_image", "missing_caption"} and skipped["bad_image"] >= 2


def test_train_stream_of_unreadable_shards_fails_clearly(tmp_path):
    directory = write_shards(tmp_path / "d", num_samples=4, samples_per_shard=2)
    for shard in directory.glob("*.tar"):
        shard.write_bytes(b"")
    with pytest.raises(UsageError, match="no sample could be read"):
        iterate(make_train_stream([resolve_source(directory)]))
