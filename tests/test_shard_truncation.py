"""A tar cut exactly between two members (a copy that stopped at a file boundary) has no end-of-archive block:
it is read as a truncated shard, not as a complete shard whose last sample lost its caption (issue 21).

.venv/bin/pytest tests/test_shard_truncation.py -q
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from mmret.data.datamodule import RetrievalDataModule
from mmret.data.samples import SkipCounter, decode_sample, iter_shard
from tests.shard_fixtures import write_shards


def cut_after_member(path: Path, member_name: str) -> None:
    """Keep the tar up to the end of one member's data blocks: the next header, and the end-of-archive zeros,
    are gone, so tarfile sees a well-formed but shorter archive."""
    with tarfile.open(path) as archive:
        member = archive.getmember(member_name)
    end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    path.write_bytes(path.read_bytes()[:end])


def test_the_fixture_cuts_at_a_member_boundary(tmp_path):
    shard = write_shards(tmp_path / "d", num_samples=6, samples_per_shard=6) / "00000.tar"
    cut_after_member(shard, "000004.jpg")
    with tarfile.open(shard, "r|") as archive:  # tarfile itself reads it as a complete archive
        names = [member.name for member in archive]
    assert names[-2:] == ["000004.cls", "000004.jpg"]


@pytest.mark.parametrize(
    ("last_member", "complete"),
    [("000004.jpg", 4), ("000003.txt", 3), ("000000.cls", 0)],
    ids=["inside-a-sample", "between-samples", "after-the-first-member"],
)
def test_a_tar_cut_at_a_member_boundary_is_a_truncated_shard(tmp_path, last_member, complete):
    shard = write_shards(tmp_path / "d", num_samples=6, samples_per_shard=6) / "00000.tar"
    cut_after_member(shard, last_member)
    counter = SkipCounter()
    raws = list(iter_shard(str(shard), counter, expected=6))
    # the sample being read when the tar stopped is dropped (it may have lost its caption or its metadata, ids
    # included); the complete ones before it are kept
    assert [raw["__key__"] for raw in raws] == [f"{i:06d}" for i in range(complete)]
    assert [decode_sample(raw)["sample_id"] for raw in raws] == list(range(complete))
    assert dict(counter.totals) == {"truncated_shard": 1, "missing_samples": 6 - complete}


def test_an_intact_tar_has_no_skips(tmp_path):
    shard = write_shards(tmp_path / "d", num_samples=6, samples_per_shard=6) / "00000.tar"
    counter = SkipCounter()
    assert len(list(iter_shard(str(shard), counter, expected=6))) == 6
    assert counter.totals == {}


def test_the_data_module_counts_a_cut_shard_as_truncated_not_as_missing_caption(tmp_path):
    directory = write_shards(tmp_path / "d", num_samples=8, samples_per_shard=8)
    cut_after_member(directory / "00000.tar", "000005.jpg")
    dm = RetrievalDataModule(val=[str(directory / "00000.tar")], batch_size=4, num_workers=0)
    dm.setup("validate")
    ids = [i for batch in dm.val_dataloader() for i in batch["sample_id"].tolist()]
    assert sorted(ids) == list(range(5))
    counts = dm.skipped_counts("val")
    assert counts.get("missing_caption", 0) == 0
    assert counts["truncated_shard"] == 1 and counts["missing_samples"] == 3
