"""Tests of `mmret shards`: every source kind round-trips, bad samples are skipped, bad input writes nothing.

.venv/bin/pytest tests/test_shard_writer.py
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmret.cli import main
from mmret.data import shard_writer
from mmret.data.image_resize import resize_image
from mmret.data.shard_writer import convert_source
from tests.shard_helpers import read_shards

RED, GREEN, BLUE = (230, 20, 20), (20, 200, 20), (20, 20, 230)


def solid(color, size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def noise_jpeg(path: Path, size=(64, 48), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path.read_bytes()


def near(pixel, color, tolerance=40) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, color))


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main(["shards", *map(str, argv)])
    return code, capsys.readouterr().err.splitlines()


def test_folder_round_trip(tmp_path, capsys):
    src, out = tmp_path / "photos", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    noise_jpeg(src / "a.jpg", size=(90, 60))
    (src / "a.txt").write_text("a cat\n\n   A   dog  \na cat\n")
    solid(GREEN).save(src / "c.webp")
    (src / "c.txt").write_text("green")
    solid(BLUE, (10, 50)).save(src / "d.bmp")
    (src / "d.txt").write_text("blue")
    solid((255, 0, 0, 0), mode="RGBA").save(src / "sub" / "b.png")  # fully transparent
    (src / "sub" / "b.txt").write_text("nothing to see")

    code, err = run_cli(capsys, src, "--output", out, "--image-size", 24, "--shard-size", 3, "--workers", 0)
    assert code == 0 and err == []
    info = json.loads((out / "dataset.json").read_text())
    assert info["num_samples"] == 4 and info["num_captions"] == 5
    assert info["shards"] == ["00000.tar", "00001.tar"] and info["shard_sizes"] == [3, 1]
    assert info["image_size"] == 24 and info["skipped"] == {} and info["source_kind"] == "folder"
    samples = read_shards(out)
    assert [s["key"] for s in samples] == [f"{i:09d}" for i in range(4)]
    assert [s["json"]["image_path"] for s in samples] == ["a.jpg", "c.webp", "d.bmp", "sub/b.png"]
    assert samples[0]["captions"] == ["a cat", "A dog"] == samples[0]["json"]["captions"]
    assert [s["json"]["id"] for s in samples] == [0, 1, 2, 3]
    for sample in samples:
        assert sample["image"].size == (24, 24) and sample["image"].mode == "RGB" and sample["cls"] is None
    assert near(samples[1]["image"].getpixel((12, 12)), GREEN)
    assert near(samples[3]["image"].getpixel((12, 12)), (255, 255, 255))  # transparency composited on white
    assert (out / "skipped.txt").read_text() == ""
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _write_table(path: Path, rows: list[dict], kind: str) -> None:
    if kind == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="," if kind == "csv" else "\t")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "\n".join(v) if isinstance(v, list) else v for k, v in row.items()})


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_table_round_trip_merges_captions_and_keeps_labels(tmp_path, kind):
    (tmp_path / "img").mkdir()
    solid(RED).save(tmp_path / "img" / "x.png")
    solid(BLUE).save(tmp_path / "img" / "y.jpg")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    solid(GREEN).save(elsewhere / "z.png")
    table = tmp_path / "meta" / f"pairs.{kind}"
    table.parent.mkdir()
    rows = [
        {"file": "../img/x.png", "text": ["a red square", "a crimson tile"], "label": 1, "url": "http://x"},
        {"file": "../img/y.jpg", "text": "a blue square", "label": 2, "url": "http://y"},
        {"file": "../img/./x.png", "text": "a red block", "label": 1, "url": "http://x2"},
        {"file": str(elsewhere / "z.png"), "text": "green", "label": 0, "url": "http://z"},
    ]
    _write_table(table, rows, kind)

    info = convert_source(
        table,
        tmp_path / "out",
        image_size=16,
        workers=0,
        image_column="file",
        caption_column="text",
        label_column="label",
        progress=False,
    )
    assert info["num_samples"] == 3 and info["skipped"] == {}
    samples = read_shards(tmp_path / "out")
    assert [s["captions"] for s in samples] == [
        ["a red square", "a crimson tile", "a red block"],
        ["a blue square"],
        ["green"],
    ]
    assert [s["cls"] for s in samples] == [b"1", b"2", b"0"]
    assert [s["json"]["label"] for s in samples] == [1, 2, 0]
    assert samples[0]["json"]["url"] == "http://x"  # other columns of the first row are kept
    for sample, color in zip(samples, (RED, BLUE, GREEN)):
        assert sample["image"].size == (16, 16) and near(sample["image"].getpixel((8, 8)), color)


def test_table_row_problems_are_skipped(tmp_path):
    solid(RED).save(tmp_path / "ok.png")
    solid(BLUE).save(tmp_path / "b.png")
    solid(GREEN).save(tmp_path / "c.png")
    rows = [
        {"image": "ok.png", "caption": "fine", "label": "3"},
        {"image": "gone.png", "caption": "no file", "label": "1"},
        {"image": "", "caption": "no path", "label": "1"},
        {"image": "https://example.com/a.jpg", "caption": "remote", "label": "1"},
        {"image": "b.png", "caption": "   ", "label": "1"},
        {"image": "c.png", "caption": "two labels", "label": "1"},
        {"image": "c.png", "caption": "again", "label": "2"},
        {"image": "ok.png", "caption": "", "label": ""},
    ]
    _write_table(tmp_path / "t.csv", rows, "csv")
    info = convert_source(
        tmp_path / "t.csv", tmp_path / "out", image_size=8, workers=0, label_column="label", progress=False
    )
    assert info["num_samples"] == 1
    assert info["skipped"] == {
        "missing_image": 2,
        "url_not_supported": 1,
        "empty_caption": 1,
        "conflicting_labels": 1,
    }
    lines = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    assert len(lines) == 5 and all(len(line.split("\t")) == 2 for line in lines)
    assert any(line.startswith("gone.png") and line.endswith("\tmissing_image") for line in lines)


def _tar_add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_img2dataset_folder_is_resharded(tmp_path):
    src = tmp_path / "laion"
    src.mkdir()
    for shard in range(2):
        with tarfile.open(src / f"{shard:05d}.tar", "w") as archive:
            for index in range(3):
                key = f"{shard:05d}{index:04d}"
                buffer = io.BytesIO()
                solid((40 * index, 100, 200), (60, 40)).save(buffer, format="JPEG")
                meta = {
                    "url": f"http://img/{key}",
                    "key": key,
                    "status": "success",
                    "caption": f"from json {key}",
                }
                _tar_add(archive, f"{key}.jpg", buffer.getvalue())
                if not (shard == 1 and index == 2):  # the last sample has its caption only in the json
                    _tar_add(archive, f"{key}.txt", f"caption {key}".encode())
                _tar_add(archive, f"{key}.json", json.dumps(meta).encode())
        (src / f"{shard:05d}_stats.json").write_text(
            json.dumps({"count": 3, "successes": 3, "failed_to_download": 0})
        )

    info = convert_source(src, tmp_path / "out", image_size=16, shard_size=4, workers=0, progress=False)
    assert info["source_kind"] == "img2dataset" and info["num_samples"] == 6
    assert info["shards"] == ["00000.tar", "00001.tar"] and info["shard_sizes"] == [4, 2]
    samples = read_shards(tmp_path / "out")
    assert [s["json"]["url"] for s in samples] == [
        f"http://img/{s:05d}{i:04d}" for s in range(2) for i in range(3)
    ]
    assert samples[0]["captions"] == ["caption 000000000"]
    assert samples[5]["captions"] == ["from json 000010002"]
    assert all(s["image"].size == (16, 16) for s in samples)
    assert [s["json"]["id"] for s in samples] == list(range(6))


def test_resize_geometry_crop_and_pad():
    stripes = Image.new("RGB", (300, 100))
    for index, color in enumerate((GREEN, RED, BLUE)):
        stripes.paste(color, (index * 100, 0, index * 100 + 100, 100))
    cropped = resize_image(stripes, 30, "center_crop")
    assert cropped.size == (30, 30)
    for x, y in ((0, 0), (29, 29), (0, 29), (15, 15)):
        assert near(cropped.getpixel((x, y)), RED)  # only the central square survives
    padded = resize_image(stripes, 30, "pad")
    assert padded.size == (30, 30)
    assert padded.getpixel((15, 0)) == (0, 0, 0) and padded.getpixel((15, 29)) == (0, 0, 0)
    assert near(padded.getpixel((2, 15)), GREEN) and near(padded.getpixel((15, 15)), RED)
    assert near(padded.getpixel((27, 15)), BLUE)
    rows = np.asarray(padded).max(axis=(1, 2))  # content is 10 rows tall, centred
    assert list(np.nonzero(rows > 30)[0]) == list(range(10, 20))
    tall = resize_image(stripes.transpose(Image.Transpose.ROTATE_90), 30, "pad")
    assert tall.getpixel((0, 15)) == (0, 0, 0) and near(tall.getpixel((15, 15)), RED)


def test_pad_mode_through_the_cli(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    solid(RED, (80, 20)).save(src / "wide.png")
    (src / "wide.txt").write_text("wide")
    code, _ = run_cli(
        capsys, src, "--output", tmp_path / "out", "--image-size", 40, "--resize-mode", "pad", "--workers", 0
    )
    assert code == 0
    image = read_shards(tmp_path / "out")[0]["image"]
    assert near(image.getpixel((20, 2)), (0, 0, 0), 10) and near(image.getpixel((20, 20)), RED)
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["resize_mode"] == "pad"


def test_corrupt_samples_are_skipped_counted_and_listed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    noise_jpeg(src / "good.jpg")
    (src / "good.txt").write_text("a good one")
    whole = noise_jpeg(tmp_path / "whole.jpg", size=(200, 200))
    (src / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (src / "truncated.txt").write_text("cut short")
    (src / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    (src / "garbage.txt").write_text("garbage")
    solid(RED).save(src / "nocaption.png")
    solid(RED).save(src / "empty.png")
    (src / "empty.txt").write_text("  \n\n \t\n")

    info = convert_source(src, tmp_path / "out", image_size=16, workers=0, progress=False)
    assert info["num_samples"] == 1
    assert info["skipped"] == {"undecodable_image": 2, "missing_caption": 1, "empty_caption": 1}
    lines = sorted((tmp_path / "out" / "skipped.txt").read_text().splitlines())
    assert lines == [
        "empty.png\tempty_caption",
        "garbage.jpg\tundecodable_image",
        "nocaption.png\tmissing_caption",
        "truncated.jpg\tundecodable_image",
    ]
    assert read_shards(tmp_path / "out")[0]["captions"] == ["a good one"]


def _folder_source(tmp_path: Path, count: int = 3) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for index in range(count):
        noise_jpeg(src / f"{index}.jpg", seed=index)
        (src / f"{index}.txt").write_text(f"image {index}")
    return src


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


BAD_INPUTS = {
    "missing column": (
        "table",
        ["--caption-column", "caption"],
        "column 'caption' (--caption-column) not found",
        "'image', 'text'",
    ),
    "missing source": ("nowhere", [], "does not exist", None),
    "unsupported kind": ("parquet", [], "not a supported kind", None),
    "folder without images": ("emptydir", [], "holds no images", None),
    "bad image size": ("folder", ["--image-size", "0"], "--image-size must be a positive", None),
    "negative shard size": ("folder", ["--shard-size", "-1"], "--shard-size", None),
    "bad resize mode": ("folder", ["--resize-mode", "stretch"], "--resize-mode 'stretch'", None),
    "bad json line": ("badjson", [], "line 2 of", None),
    "column flag on folder": ("folder", ["--label-column", "y"], "applies only to .csv/.tsv/.jsonl", None),
    "nothing usable": ("allbad", [], "no usable sample", "undecodable_image: 1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    kind, extra, phrase, detail = BAD_INPUTS[case]
    src = tmp_path / "nowhere"
    if kind == "folder":
        src = _folder_source(tmp_path)
    elif kind == "table":
        src = tmp_path / "pairs.csv"
        src.write_text("image,text\na.jpg,hello\n")
    elif kind == "parquet":
        src = tmp_path / "pairs.parquet"
        src.write_bytes(b"PAR1")
    elif kind == "emptydir":
        src = tmp_path / "empty"
        src.mkdir()
        (src / "notes.md").write_text("no images here")
    elif kind == "badjson":
        src = tmp_path / "pairs.jsonl"
        src.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": oops}\n')
    elif kind == "allbad":
        src = tmp_path / "bad"
        src.mkdir()
        (src / "x.jpg").write_bytes(b"nope")
        (src / "x.txt").write_text("caption")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "deep" / "out"
    code, err = run_cli(capsys, src, "--output", out, "--image-size", 16, "--workers", 0, *extra)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("mmret shards: error: ") and phrase in err[0]
    if detail:
        assert detail in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # not even the parent folder stays


def test_non_empty_output_needs_overwrite(tmp_path, capsys):
    src, out = _folder_source(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, src, "--output", out, "--image-size", 8, "--workers", 0)
    assert code == 2 and len(err) == 1 and "not empty; pass --overwrite" in err[0]
    # --overwrite does not delete a folder that is not an mmret dataset either.
    code, err = run_cli(capsys, src, "--output", out, "--image-size", 8, "--workers", 0, "--overwrite")
    assert code == 2 and len(err) == 1 and "holds no dataset.json" in err[0]
    assert _snapshot(out) == {"keep.txt": b"mine"}


def test_overwrite_replaces_and_failed_overwrite_keeps_old_output(tmp_path, capsys, monkeypatch):
    src, out = _folder_source(tmp_path, count=3), tmp_path / "out"
    assert run_cli(capsys, src, "--output", out, "--image-size", 8, "--shard-size", 1, "--workers", 0)[0] == 0
    old = _snapshot(out)
    assert sorted(old) == ["00000.tar", "00001.tar", "00002.tar", "dataset.json", "skipped.txt"]

    table = tmp_path / "t.csv"
    table.write_text("where,what\n0.jpg,x\n")  # columns of no usual name (tests/test_input_conventions.py)
    code, err = run_cli(capsys, table, "--output", out, "--image-size", 8, "--overwrite")
    assert code == 2 and len(err) == 1 and "columns found: 'where', 'what'" in err[0]
    assert _snapshot(out) == old

    calls = []

    def failing_encode(image, quality):  # fails mid-way, after the first tar is complete
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return b"jpeg"

    monkeypatch.setattr(shard_writer, "encode_jpeg", failing_encode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_source(src, out, image_size=8, shard_size=1, workers=0, overwrite=True, progress=False)
    assert _snapshot(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "t.csv"]  # no partial folders left
    with pytest.raises(RuntimeError, match="disk on fire"):  # a new output vanishes with its new parents
        calls.clear()
        convert_source(src, tmp_path / "new" / "out", image_size=8, shard_size=1, workers=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "t.csv"]
    monkeypatch.undo()

    (src / "3.jpg").write_bytes((src / "0.jpg").read_bytes())
    (src / "3.txt").write_text("a fourth")
    info = convert_source(src, out, image_size=8, shard_size=10, workers=0, overwrite=True, progress=False)
    assert info["num_samples"] == 4
    assert sorted(_snapshot(out)) == ["00000.tar", "dataset.json", "skipped.txt"]  # old shards are gone


def test_empty_existing_output_is_written_in_place(tmp_path):
    src, out = _folder_source(tmp_path), tmp_path / "out"
    out.mkdir()
    inode = out.stat().st_ino
    convert_source(src, out, image_size=8, workers=0, progress=False)
    assert out.stat().st_ino == inode and (out / "00000.tar").is_file()


def test_output_is_deterministic_and_independent_of_workers(tmp_path):
    src = _folder_source(tmp_path, count=7)
    convert_source(src, tmp_path / "a", image_size=20, shard_size=3, workers=0, progress=False)
    convert_source(src, tmp_path / "b", image_size=20, shard_size=3, workers=2, progress=False)
    tars_a = {k: v for k, v in _snapshot(tmp_path / "a").items() if k.endswith(".tar")}
    tars_b = {k: v for k, v in _snapshot(tmp_path / "b").items() if k.endswith(".tar")}
    assert sorted(tars_a) == ["00000.tar", "00001.tar", "00002.tar"] and tars_a == tars_b
    convert_source(src, tmp_path / "c", image_size=21, shard_size=3, workers=0, progress=False)
    assert _snapshot(tmp_path / "c")["00000.tar"] != tars_a["00000.tar"]


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds

    src = _folder_source(tmp_path, count=3)
    convert_source(src, tmp_path / "out", image_size=12, shard_size=2, workers=0, progress=False)
    urls = [str(tmp_path / "out" / name) for name in ("00000.tar", "00001.tar")]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json"))
    assert [text for _, text, _ in samples] == ["image 0", "image 1", "image 2"]
    assert all(image.size == (12, 12) and meta["captions"] == [text] for image, text, meta in samples)
