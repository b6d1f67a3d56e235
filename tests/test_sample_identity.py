"""Sample identity is unique across shard sets: the shards of two sets merged into one folder keep every image
(issue: ids restarted at 0 in every set, so a merged folder lost images silently in eval, masking and mining).

.venv/bin/pytest tests/test_sample_identity.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mmret.cli import main
from mmret.data.samples import SkipCounter, decode_sample, iter_shard, sample_id_of
from mmret.data.shard_writer import convert_source
from tests.test_shard_writer import noise_jpeg


def two_sets_merged(tmp_path: Path, sizes=(7, 5)) -> Path:
    """Two folders of captioned images converted by `mmret shards` separately, then their tars copied into one
    folder (renamed so they do not overwrite each other), as a user merging two shard sets would."""
    merged = tmp_path / "merged"
    merged.mkdir(parents=True)
    for number, size in enumerate(sizes):
        source = tmp_path / f"photos{number}"
        source.mkdir()
        for index in range(size):
            noise_jpeg(source / f"{index}.jpg", seed=100 * number + index)
            (source / f"{index}.txt").write_text(f"set {number} image {index}")
        convert_source(source, tmp_path / f"set{number}", image_size=16, workers=0, progress=False)
        for tar in sorted((tmp_path / f"set{number}").glob("*.tar")):
            shutil.copy(tar, merged / f"{number}{tar.name}")
    return merged


def test_two_merged_sets_have_distinct_ids(tmp_path):
    merged = two_sets_merged(tmp_path)
    counter = SkipCounter()
    samples = [
        decode_sample(raw) for tar in sorted(merged.glob("*.tar")) for raw in iter_shard(str(tar), counter)
    ]
    assert len(samples) == 12
    assert len({sample["sample_id"] for sample in samples}) == 12  # ids 0..6 and 0..4 no longer collide
    assert len({sample["metadata"]["id"] for sample in samples}) == 7  # what the files themselves number


def test_eval_of_a_merged_folder_counts_every_image(tmp_path, trained_checkpoint):
    merged = two_sets_merged(tmp_path)
    output = tmp_path / "results.json"
    assert main(["eval", "--model", str(trained_checkpoint), "--data", str(merged), "--task", "retrieval",
                 "--output", str(output), "--device", "cpu", "--num-workers", "0"]) == 0  # fmt: skip
    results = json.loads(output.read_text())
    assert results["num_images"] == 12 and results["num_texts"] == 12


def test_ids_without_an_id_space_are_kept_and_rebuilds_are_stable(tmp_path):
    assert sample_id_of({"id": 5}, "00000.tar", "k") == 5  # shards of older versions / other tools
    assert (
        sample_id_of({}, "00000.tar", "k")
        == sample_id_of({}, "00000.tar", "k")
        != sample_id_of({}, "1.tar", "k")
    )
    assert sample_id_of({"id": 5, "id_space": "a"}, "x", "k") != sample_id_of(
        {"id": 5, "id_space": "b"}, "x", "k"
    )
    merged_a, merged_b = two_sets_merged(tmp_path / "a"), two_sets_merged(tmp_path / "b")

    def ids(folder):
        counter = SkipCounter()
        return [decode_sample(raw)["sample_id"] for tar in sorted(folder.glob("*.tar")) for raw in
                iter_shard(str(tar), counter)]  # fmt: skip

    assert not set(ids(merged_a)) & set(ids(merged_b))  # other source folders: other sets, other ids
    # the same source converted again, into another folder: the same samples, the same ids
    again = tmp_path / "again"
    convert_source(tmp_path / "a" / "photos0", again, image_size=16, workers=0, progress=False)
    assert set(ids(again)) < set(ids(merged_a))
