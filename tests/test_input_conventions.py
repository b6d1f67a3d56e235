"""Input conventions (issue 18): table columns recognised by their usual names, and shard sets without counts
counted once from their tar headers and cached beside them.

    .venv/bin/pytest tests/test_input_conventions.py -q
"""

from __future__ import annotations

import errno
import io
import json
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from mmret.cli import main
from mmret.data import shard_sets
from mmret.data.samples import IMAGE_EXTENSIONS, SkipCounter, count_shard_samples, iter_shard
from mmret.data.shard_sets import COUNTS_FILE, resolve_source
from tests.fit_args import DUAL_ENCODER, fit_argv
from tests.shard_fixtures import jpeg_bytes
from tests.shard_helpers import read_shards

AUTO = "(auto-detected; set --image-column/--caption-column to choose)"


def write_table(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """A CSV/TSV (by suffix) or JSONL table; images named in it are written beside it as tiny PNGs."""
    for index in range(3):
        Image.new("RGB", (12, 10), (60 * index, 90, 30)).save(path.parent / f"{index}.png")
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(header, row))) + "\n" for row in rows))
    else:
        separator = "\t" if path.suffix == ".tsv" else ","
        path.write_text("".join(separator.join(line) + "\n" for line in [header, *rows]))
    return path


def pairs(count: int = 3) -> list[list[str]]:
    return [[f"{index}.png", f"picture {index}"] for index in range(count)]


def shards_cli(capsys, src: Path, out: Path, *flags: str) -> tuple[int, list[str], list[str]]:
    code = main(["shards", str(src), "--output", str(out), "--image-size", "8", "--workers", "0", *flags])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


# ---- table columns -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, header",
    [
        ("open_clip.csv", ["filepath", "title"]),
        ("img2dataset.csv", ["url", "caption"]),  # a url column of local paths
        ("plain.csv", ["image", "text"]),
        ("paths.tsv", ["image_path", "caption"]),
        ("files.csv", ["file", "text"]),
        ("short.tsv", ["img", "txt"]),
        ("hf_imagefolder.jsonl", ["file_name", "text"]),
        ("mixed_case.csv", ["FilePath", "Title"]),
    ],
)
def test_conventional_columns_need_no_flags(tmp_path, capsys, name, header):
    table = write_table(tmp_path / name, header, pairs())
    code, out, err = shards_cli(capsys, table, tmp_path / "out")
    assert code == 0, err
    assert out[0] == f"columns: image from {header[0]!r}, caption from {header[1]!r} {AUTO}"
    samples = read_shards(tmp_path / "out")
    assert [sample["captions"] for sample in samples] == [[f"picture {index}"] for index in range(3)]


def test_a_local_path_column_wins_over_a_url_column_and_labels_are_read_only_when_named(tmp_path, capsys):
    rows = [
        [f"http://example.com/{index}.jpg", f"{index}.png", f"picture {index}", "1"] for index in range(3)
    ]
    table = write_table(tmp_path / "pairs.csv", ["url", "filepath", "title", "label"], rows)
    code, out, _ = shards_cli(capsys, table, tmp_path / "out")
    assert code == 0
    assert out[0] == (
        f"columns: image from 'filepath', caption from 'title' {AUTO}; column 'label' is not read as labels "
        "without --label-column"
    )
    samples = read_shards(tmp_path / "out")
    assert [sample["cls"] for sample in samples] == [None] * 3
    assert samples[0]["json"]["url"] == "http://example.com/0.jpg"  # kept as metadata

    code, out, _ = shards_cli(capsys, table, tmp_path / "labelled", "--label-column", "label")
    assert code == 0
    assert out[0].startswith("columns: image from 'filepath', caption from 'title', label from 'label' (image "
                             "and caption auto-detected;")  # fmt: skip
    assert [sample["cls"] for sample in read_shards(tmp_path / "labelled")] == [b"1"] * 3


def test_flags_still_win(tmp_path, capsys):
    rows = [[f"{index}.png", f"short {index}", f"long {index}"] for index in range(3)]
    table = write_table(tmp_path / "pairs.csv", ["image", "caption", "description"], rows)
    code, out, _ = shards_cli(capsys, table, tmp_path / "a", "--caption-column", "description")
    assert code == 0
    assert out[0] == (
        "columns: image from 'image', caption from 'description' (image auto-detected; set --image-column to "
        "choose)"
    )
    assert read_shards(tmp_path / "a")[0]["captions"] == ["long 0"]
    code, out, _ = shards_cli(capsys, table, tmp_path / "b", "--image-column", "image", "--caption-column",
                              "caption")  # fmt: skip
    assert code == 0 and not out[0].startswith("columns:")  # nothing was guessed, nothing to say


@pytest.mark.parametrize(
    "header, phrase",
    [
        (["picture", "words"], "cannot tell the image and caption columns of"),
        (["image", "title", "text"], "cannot tell the caption column of"),
        (["filepath", "path", "caption"], "cannot tell the image column of"),
    ],
)
def test_unknown_or_ambiguous_columns_are_one_line_listing_them(tmp_path, capsys, header, phrase):
    table = write_table(tmp_path / "pairs.csv", header, [["0.png", "a", "b"][: len(header)]])
    code, out, err = shards_cli(capsys, table, tmp_path / "out")
    assert code == 2 and len(err) == 1 and not out
    assert err[0].startswith("mmret shards: error: ") and phrase in err[0]
    assert f"columns found: {', '.join(map(repr, header))}" in err[0]
    flags = [flag for flag in ("--image-column", "--caption-column") if flag.split("-")[2] in phrase]
    assert all(f"{flag} COLUMN" in err[0] for flag in flags)
    assert not (tmp_path / "out").exists()


def test_a_url_column_of_web_addresses_is_refused_in_one_line(tmp_path, capsys):
    rows = [[f"https://example.com/{index}.jpg", f"picture {index}"] for index in range(3)]
    table = write_table(tmp_path / "urls.csv", ["url", "caption"], rows)
    code, _, err = shards_cli(capsys, table, tmp_path / "out")
    assert code == 2 and len(err) == 1
    assert "column 'url'" in err[0] and "holds URLs" in err[0] and "download the images first" in err[0]
    assert not (tmp_path / "out").exists()


# ---- counting shards without counts ------------------------------------------------------------------------


def write_plain_shards(directory: Path, sizes: list[int], start: int = 0) -> Path:
    """Shards as plain `webdataset.TarWriter` writes them: KEY.jpg + KEY.txt, no dataset.json, no stats."""
    directory.mkdir(parents=True, exist_ok=True)
    index = start
    for shard, size in enumerate(sizes):
        with wds.TarWriter(str(directory / f"shard-{shard:03d}.tar")) as writer:
            for _ in range(size):
                writer.write(
                    {"__key__": f"s{index:05d}", "jpg": jpeg_bytes(index, 16), "txt": f"image {index}"}
                )
                index += 1
    return directory


def test_fit_trains_on_a_plain_webdataset_folder(tmp_path, capsys):
    data = write_plain_shards(tmp_path / "web", [20, 12])
    run_dir = tmp_path / "run"
    code = main(fit_argv(module=DUAL_ENCODER, train=data, max_epochs=1, run_dir=run_dir))
    out = capsys.readouterr().out
    assert code == 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert f"counted 32 samples in 2 shards of {data} (cached in {data / COUNTS_FILE})" in out
    counts = json.loads((data / COUNTS_FILE).read_text())["shards"]
    assert {name: entry["samples"] for name, entry in counts.items()} == {
        "shard-000.tar": 20,
        "shard-001.tar": 12,
    }


def test_counts_are_cached_and_a_changed_shard_is_counted_again(tmp_path, capsys, monkeypatch):
    data = write_plain_shards(tmp_path / "web", [5, 3, 4])
    assert resolve_source(data).shard_sizes == (5, 3, 4)
    assert (
        capsys.readouterr().out
        == f"counted 12 samples in 3 shards of {data} (cached in {data / COUNTS_FILE})\n"
    )

    def no_scanning(path):
        raise AssertionError(f"{path} was scanned again")

    monkeypatch.setattr(shard_sets, "count_shard_samples", no_scanning)
    again = resolve_source(data)
    assert again.shard_sizes == (5, 3, 4) and again.num_samples == 12
    assert resolve_source(f"{data}/shard-00[12].tar").shard_sizes == (3, 4)
    assert capsys.readouterr().out == ""  # nothing counted, nothing said

    monkeypatch.undo()
    with wds.TarWriter(str(data / "shard-001.tar")) as writer:  # rewritten with other samples
        for index in range(7):
            writer.write({"__key__": f"new{index}", "jpg": jpeg_bytes(index, 16), "txt": "new"})
    assert resolve_source(data).shard_sizes == (5, 7, 4)
    assert capsys.readouterr().out.startswith(f"counted 7 samples in 1 shard of {data} (cached in")
    assert json.loads((data / COUNTS_FILE).read_text())["shards"]["shard-001.tar"]["samples"] == 7


def test_a_folder_that_cannot_take_the_cache_is_still_counted(tmp_path, capsys, monkeypatch):
    data = write_plain_shards(tmp_path / "web", [4])

    def read_only(path, content, option="--output"):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(shard_sets, "write_json_atomic", read_only)
    assert resolve_source(data).num_samples == 4
    out = capsys.readouterr().out
    assert out.startswith(f"counted 4 samples in 1 shard of {data} (not cached: ")
    assert len(out.splitlines()) == 1 and "Read-only file system" in out and not (data / COUNTS_FILE).exists()
    how = out.split(" runs ", 1)[1].rstrip(")\n")  # the command that caches them, once the folder is writable
    monkeypatch.undo()
    argv = shlex.split(how)
    assert argv[0] == "python"
    ran = subprocess.run([sys.executable, *argv[1:]], check=True, capture_output=True, text=True)
    assert ran.stdout.startswith(f"counted 4 samples in 1 shard of {data} (cached in")
    assert json.loads((data / COUNTS_FILE).read_text())["shards"]["shard-000.tar"]["samples"] == 4


def test_counted_sets_feed_epoch_length_and_eval_totals(tmp_path):
    from mmret.data.datamodule import RetrievalDataModule

    data = write_plain_shards(tmp_path / "web", [10, 6])
    dm = RetrievalDataModule(train=str(data), val=str(data), batch_size=4, num_workers=0)
    assert dm.num_train_batches() == 4
    assert [source.num_samples for source in dm.sources("val")] == [16]


def test_the_count_is_what_the_reader_yields_even_for_a_cut_shard(tmp_path):
    """Samples without an image are not counted; a tar cut anywhere counts what iter_shard still yields."""
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as archive:
        for name in ["a.jpg", "a.txt", "b.txt", "c.png", "c.json", "__meta__.json", "d.seg.jpg", "e.webp"]:
            member = tarfile.TarInfo(name)
            member.size = 300
            archive.addfile(member, io.BytesIO(b"x" * 300))
    data = whole.read_bytes()
    cut = tmp_path / "cut.tar"
    for end in [*range(0, len(data), 211), len(data) - 1024, len(data)]:
        cut.write_bytes(data[:end])
        read = sum(
            any(extension in raw for extension in IMAGE_EXTENSIONS)
            for raw in iter_shard(str(cut), SkipCounter())
        )
        assert count_shard_samples(str(cut)) == read, end
    assert count_shard_samples(str(whole)) == 3  # a, c, e (b has no image; d's extension is seg.jpg)
