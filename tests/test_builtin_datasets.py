"""Tests of the built-in datasets (`mmret datasets digits|shapes`): contents, determinism, held-out design.

.venv/bin/pytest tests/test_builtin_datasets.py              # the full shapes build is in the slow tier
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmret.cli import main
from mmret.data import builtin, shapes
from mmret.data.builtin import BUILTIN_DATASETS, build_dataset
from mmret.data.digits import CLASS_NAMES, captions_for, render
from mmret.data.shard_writer import write_shards
from mmret.errors import UsageError
from tests.shard_helpers import read_shards, tar_bytes

SPLITS = ("train", "val", "test")


def info(root: Path, split: str) -> dict:
    return json.loads((root / split / "dataset.json").read_text())


# -- digits ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "digits"
    assert main(["datasets", "digits", "--output", str(root), "--image-size", "16"]) == 0
    return root


def test_digits_captions_and_rendering():
    captions = captions_for(index=5, label=7, seed=0)
    assert 2 <= len(captions) <= 4 and len(set(captions)) == len(captions)
    assert all("seven" in c or "7" in c for c in captions)
    assert captions == captions_for(index=5, label=7, seed=0)  # depends on (seed, index) only
    assert any(
        captions_for(index=i, label=7, seed=0) != captions_for(index=i, label=7, seed=1) for i in range(5)
    )
    counts = Counter(len(captions_for(index=i, label=i % 10, seed=0)) for i in range(300))
    assert set(counts) == {2, 3, 4}
    scan = np.zeros((8, 8))
    scan[:, 3:5] = 16  # a vertical stroke of full ink
    image = render(scan, 32)
    pixels = np.asarray(image)
    assert image.size == (32, 32) and image.mode == "RGB"
    assert pixels[16, 16].max() < 40 and pixels[16, 2].min() > 230  # dark ink on white paper


@pytest.mark.slow
def test_digits_splits_labels_and_captions(digits_root):
    from sklearn.datasets import load_digits

    scans = load_digits().images
    seen_ids = []
    for split, size, per_class in (("train", 1297, None), ("val", 200, 20), ("test", 300, 30)):
        meta = info(digits_root, split)
        assert meta["num_samples"] == size and meta["class_names"] == CLASS_NAMES and meta["seed"] == 0
        assert (
            meta["image_size"] == 16
            and all("{}" in t for t in meta["templates"])
            and len(meta["templates"]) >= 3
        )
        samples = read_shards(digits_root / split)
        labels = Counter(int(s["cls"]) for s in samples)
        if per_class:  # stratified: load_digits has 174-183 scans per class
            assert sorted(labels) == list(range(10)) and all(abs(n - per_class) <= 1 for n in labels.values())
        for sample in samples[:150]:
            label, meta_json = int(sample["cls"]), sample["json"]
            assert meta_json["label"] == label and meta_json["class_name"] == CLASS_NAMES[label]
            assert 2 <= len(sample["captions"]) <= 4 and len(set(sample["captions"])) == len(
                sample["captions"]
            )
            assert all(CLASS_NAMES[label] in c or str(label) in c for c in sample["captions"])
            image = sample["image"]
            assert image.size == (16, 16)
            # The stored picture is the scan: shrunk back to 8×8 it correlates strongly with the ink.
            small = np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=float)
            ink = scans[meta_json["source_index"]]
            assert np.corrcoef(-small.ravel(), ink.ravel())[0, 1] > 0.9
        seen_ids += [s["json"]["id"] for s in samples]
    assert sorted(seen_ids) == list(range(1797))  # every scan used once, ids unique across splits


@pytest.mark.slow
def test_digits_deterministic_by_seed_and_overwrite(digits_root, tmp_path):
    again = build_dataset("digits", tmp_path / "d", seed=0, image_size=16, progress=False)
    for split in SPLITS:
        assert tar_bytes(again / split) == tar_bytes(digits_root / split)
    # Same parameters again: nothing to do; other parameters: an error unless overwrite.
    assert build_dataset("digits", again, seed=0, image_size=16, progress=False) == again
    with pytest.raises(UsageError, match="not empty; pass --overwrite"):
        build_dataset("digits", again, seed=1, image_size=16)
    build_dataset("digits", again, seed=1, image_size=16, overwrite=True, progress=False)
    assert info(again, "test")["seed"] == 1
    assert tar_bytes(again / "test") != tar_bytes(digits_root / "test")
    test_ids = {s["json"]["id"] for s in read_shards(again / "test")}
    assert test_ids != {s["json"]["id"] for s in read_shards(digits_root / "test")}


# -- CLI and build mechanics -----------------------------------------------------------------------------


def test_unknown_dataset_is_one_line_exit_2(tmp_path, capsys):
    code = main(["datasets", "mnist", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and "'mnist'" in err[0] and "digits, shapes, digit_scenes" in err[0]
    assert BUILTIN_DATASETS == ("digits", "shapes", "digit_scenes")
    assert main(["datasets", "shapes", "--output", str(tmp_path / "out"), "--image-size", "0"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_concurrent_build_keeps_the_first_complete_copy(tmp_path, monkeypatch):
    """Two ranks building at once: the one that finishes second returns the first one's dataset."""
    root = tmp_path / "data" / "shapes"

    def fake_write_shards(samples, output_dir, **kwargs):
        Path(output_dir).mkdir()
        (Path(output_dir) / "dataset.json").write_text("{}")
        if not root.exists():  # the other rank finishes first, while we are still writing
            for split in SPLITS:
                (root / split).mkdir(parents=True)
                (root / split / "dataset.json").write_text('{"by": "other rank"}')

    monkeypatch.setattr(builtin, "write_shards", fake_write_shards)
    assert build_dataset("shapes", root) == root
    assert json.loads((root / "test" / "dataset.json").read_text()) == {"by": "other rank"}
    assert sorted(p.name for p in root.parent.iterdir()) == ["shapes"]  # our partial copy is gone


# -- shapes: planning (fast, no rendering) ---------------------------------------------------------------


def binding_pairs(kind: str, relation: str | None, objects: list) -> list[tuple]:
    """(first, relation, second) orders a scene shows: the pair itself, or every left-of pair of a row."""
    if kind == "pair":
        return [(objects[0], relation, objects[1])]
    if kind == "triple":
        return [(objects[i], "left of", objects[j]) for i in range(3) for j in range(i + 1, 3)]
    return []


def is_unseen(kind: str, relation: str | None, objects: list) -> bool:
    return any(tuple(o) in shapes.HELD_OUT_BINDINGS for o in objects) or any(
        (tuple(a), rel, tuple(b)) in shapes.HELD_OUT_ORDERS
        for a, rel, b in binding_pairs(kind, relation, objects)
    )


@pytest.mark.parametrize("seed", [0, 3])
def test_shapes_plan_holds_out_compositions(seed):
    plans = {split: shapes.plan_split(split, seed) for split in SPLITS}
    assert [len(plans[s]) for s in SPLITS] == [5000, 500, 1000]
    for split in ("train", "val"):
        assert not any(is_unseen(sc.kind, sc.relation, list(sc.objects)) for sc, _, _ in plans[split])
    test_scenes = [scene for scene, _, _ in plans["test"]]
    unseen = [scene for scene in test_scenes if is_unseen(scene.kind, scene.relation, list(scene.objects))]
    assert 0.3 <= len(unseen) / len(test_scenes) <= 0.6
    shown_bindings = {o for scene in unseen for o in scene.objects}
    assert set(shapes.HELD_OUT_BINDINGS) <= shown_bindings
    shown_orders = {
        o for scene in unseen for o in binding_pairs(scene.kind, scene.relation, list(scene.objects))
    }
    assert set(shapes.HELD_OUT_ORDERS) <= shown_orders
    # The reverse of every held-out order is seen in training, so the order is the only new thing.
    train_orders = {
        o for sc, _, _ in plans["train"] for o in binding_pairs(sc.kind, sc.relation, list(sc.objects))
    }
    assert all((b, rel, a) in train_orders for a, rel, b in shapes.HELD_OUT_ORDERS)


def test_shapes_swap_groups_share_words_but_not_captions():
    groups = defaultdict(list)
    for scene, group, variant in shapes.plan_split("test", 0):
        if group is not None:
            groups[group].append((variant, scene))
    assert len(groups) == 232
    for members in groups.values():
        assert len(members) in (3, 4) and members[0][1].kind in ("pair", "triple")
        bags = {tuple(sorted(scene.captions()[0].replace(",", "").split())) for _, scene in members}
        assert len(bags) == 1  # bag-of-words cannot tell the members apart
        assert len({scene.captions()[0] for _, scene in members}) == len(members)
    base = shapes.pair_variants(("red", "circle"), ("blue", "square"), "left of")
    assert [scene.captions()[0] for _, scene in base] == [
        "a red circle left of a blue square",
        "a blue square left of a red circle",
        "a blue circle left of a red square",
        "a red square left of a blue circle",
    ]


# -- shapes: the full build (slow tier) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return build_dataset("shapes", tmp_path_factory.mktemp("shapes") / "shapes", seed=0, progress=False)


@pytest.mark.slow
def test_shapes_dataset_json_and_parts(shapes_root):
    for split, size in zip(SPLITS, (5000, 500, 1000)):
        meta = info(shapes_root, split)
        assert meta["num_samples"] == size and meta["image_size"] == 64
        assert "purple triangle" in meta["held_out"]["bindings"]
        assert "red circle left of blue square" in meta["held_out"]["orders"]
        samples = read_shards(shapes_root / split)
        parts = Counter(s["json"]["part"] for s in samples)
        assert dict(meta["parts"]) == {"seen": parts["seen"], "unseen": parts["unseen"]}
        for sample in samples:
            m = sample["json"]
            objects = [(o["color"], o["shape"]) for o in m["objects"]]
            assert (
                (m["part"] == "unseen")
                == is_unseen(m["kind"], m["relation"], objects)
                == bool(m["unseen_reasons"])
            )
            assert sample["captions"] == m["captions"] and 2 <= len(m["captions"]) <= 3
        if split != "test":
            assert parts["unseen"] == 0
        else:
            assert parts["unseen"] >= 300 and parts["seen"] >= 300
    ids = [s["json"]["id"] for split in SPLITS for s in read_shards(shapes_root / split)]
    assert len(set(ids)) == len(ids) == 6500


@pytest.mark.slow
def test_shapes_test_captions_have_swap_partner_images(shapes_root):
    samples = [s["json"] for s in read_shards(shapes_root / "test")]

    def bag(caption: str) -> tuple:
        return tuple(sorted(caption.replace(",", "").split()))

    images_by_bag = defaultdict(list)
    for index, meta in enumerate(samples):
        for caption in meta["captions"]:
            images_by_bag[bag(caption)].append(index)
    captions = {
        c: {i for i, m in enumerate(samples) if c in m["captions"]} for m in samples for c in m["captions"]
    }
    # A partner: an image the caption does not describe whose own caption has exactly the same words.
    with_partner = [c for c, owners in captions.items() if set(images_by_bag[bag(c)]) - owners]
    assert len(with_partner) / len(captions) >= 0.85
    in_group = [m for m in samples if m["swap_group"] is not None]
    assert len(in_group) / len(samples) >= 0.85


@pytest.mark.slow
def test_shapes_pixels_and_geometry_match_captions(shapes_root):
    palette = {name: np.array(rgb) for name, rgb in shapes.COLORS.items()}
    for split in ("train", "test"):
        for sample in read_shards(shapes_root / split)[:80]:
            meta, pixels = sample["json"], np.asarray(sample["image"], dtype=int)
            for obj in meta["objects"]:
                x, y = int(obj["x"]), int(obj["y"])
                patch = np.median(pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3), axis=0)
                nearest = min(palette, key=lambda name: np.abs(palette[name] - patch).sum())
                assert nearest == obj["color"], (meta["description"], obj, patch)
            assert pixels[0, 0].min() > 200  # the corner is background
            names = [f"{o['color']} {o['shape']}" for o in meta["objects"]]
            first = meta["captions"][0]
            assert [first.index(n) for n in names] == sorted(first.index(n) for n in names)
            if meta["kind"] == "pair":
                a, b = meta["objects"]
                along, across = ("x", "y") if meta["relation"] == "left of" else ("y", "x")
                assert b[along] - a[along] > 0.3 * 64 and abs(b[across] - a[across]) < 0.1 * 64
            if meta["kind"] == "single":
                assert first == f"a {meta['objects'][0]['size']} {names[0]}"


@pytest.mark.slow
def test_shapes_deterministic_by_seed(shapes_root, tmp_path):
    again = build_dataset("shapes", tmp_path / "same", seed=0, progress=False)
    for split in SPLITS:
        assert tar_bytes(again / split) == tar_bytes(shapes_root / split)
    # Another seed, through the same writer (only the val split, to keep this test short).
    count, samples, extra = shapes.build_splits(seed=1, image_size=64)["val"]
    write_shards(
        samples,
        tmp_path / "other",
        image_size=64,
        total=count,
        info={"name": "shapes", **extra},
        progress=False,
    )
    assert tar_bytes(tmp_path / "other") != tar_bytes(shapes_root / "val")
    assert [s["json"]["description"] for s in read_shards(tmp_path / "other")] != [
        s["json"]["description"] for s in read_shards(shapes_root / "val")
    ]
