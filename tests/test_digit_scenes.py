"""The built-in `digit_scenes` dataset: shapes' held-out compositions drawn with real handwritten digit scans.

.venv/bin/pytest tests/test_digit_scenes.py            # the full build is in the slow tier
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from mmret.data import digit_scenes, digits, shapes
from mmret.data.builtin import build_dataset
from tests.shard_helpers import read_shards, tar_bytes

SPLITS = ("train", "val", "test")
VOCABULARY = digit_scenes.VOCABULARY


def orders_of(scene: shapes.Scene) -> list[tuple]:
    if scene.kind == "pair":
        return [(scene.objects[0], scene.relation, scene.objects[1])]
    if scene.kind == "triple":
        return [(scene.objects[i], "left of", scene.objects[j]) for i in range(3) for j in range(i + 1, 3)]
    return []


def test_plan_holds_out_bindings_and_orders_and_shows_their_reverse_in_train():
    plans = {split: shapes.plan_split(split, 0, VOCABULARY) for split in SPLITS}
    assert [len(plans[s]) for s in SPLITS] == [5000, 500, 1000]
    held_bindings, held_orders = set(VOCABULARY.held_out_bindings), set(VOCABULARY.held_out_orders)
    for split in ("train", "val"):
        for scene, _, _ in plans[split]:
            assert not set(scene.objects) & held_bindings and not set(orders_of(scene)) & held_orders
    test = [scene for scene, _, _ in plans["test"]]
    unseen = [scene for scene in test if scene.unseen_reasons()]
    assert 0.3 <= len(unseen) / len(test) <= 0.6
    assert held_bindings <= {o for scene in unseen for o in scene.objects}
    assert held_orders <= {o for scene in unseen for o in orders_of(scene)}
    train_orders = Counter(o for scene, _, _ in plans["train"] for o in orders_of(scene))
    assert all(train_orders[(b, rel, a)] >= 6 for a, rel, b in held_orders)
    # Every colour and every digit is still seen in train, only in other bindings.
    train_objects = {o for scene, _, _ in plans["train"] for o in scene.objects}
    assert {c for c, _ in train_objects} == set(digit_scenes.COLORS)
    assert {d for _, d in train_objects} == set(digits.CLASS_NAMES)
    caption = shapes.pair_variants(("red", "seven"), ("blue", "three"), "left of", VOCABULARY)[0][
        1
    ].captions()
    assert caption[0] == "a red seven left of a blue three"


def test_shapes_plan_is_unchanged_by_the_shared_planner():
    # shapes' own vocabulary through the shared planner: the same scenes as its first split plan lists.
    plan = shapes.plan_split("test", 0)
    assert plan == shapes.plan_split("test", 0, shapes.SHAPES_VOCABULARY)
    assert all(scene.vocabulary is shapes.SHAPES_VOCABULARY for scene, _, _ in plan)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return build_dataset(
        "digit_scenes", tmp_path_factory.mktemp("ds") / "digit_scenes", seed=0, progress=False
    )


@pytest.mark.slow
def test_images_are_real_scans_of_their_split_in_the_captioned_colour(root):
    scans, labels = load_digits(return_X_y=False).images, load_digits().target
    pools = {split: set(map(int, idx)) for split, idx in digits.split_indices(labels.astype(int), 0).items()}
    used = defaultdict(set)
    palette = {name: np.array(rgb) for name, rgb in digit_scenes.COLORS.items()}
    for split in SPLITS:
        meta = json.loads((root / split / "dataset.json").read_text())
        assert meta["word_classes"]["digit"] == {"role": "object", "words": list(digits.CLASS_NAMES)}
        samples = read_shards(root / split)
        assert len(samples) == meta["num_samples"]
        assert Counter(s["json"]["part"] for s in samples) == Counter(meta["parts"])
        for sample in samples:
            m = sample["json"]
            sources = [o["source_index"] for o in m["objects"]]
            assert len(set(sources)) == len(sources)
            for obj in m["objects"]:
                assert obj["source_index"] in pools[split] and labels[obj["source_index"]] == obj["label"]
                assert digits.CLASS_NAMES[obj["label"]] == obj["digit"]
                used[split].add(obj["source_index"])
            names = [f"{o['color']} {o['digit']}" for o in m["objects"]]
            first = m["captions"][0]
            assert [first.index(n) for n in names] == sorted(first.index(n) for n in names)
        # Ink pixels of a sample's first object: near its colour, darker than the background.
        for sample in samples[:60]:
            pixels = np.asarray(sample["image"], dtype=float)
            obj = sample["json"]["objects"][0]
            x, y, r = (int(round(obj[k])) for k in ("x", "y", "r"))
            box = pixels[max(0, y - r) : y + r, max(0, x - r) : x + r].reshape(-1, 3)
            ink = box[box.sum(1) < np.percentile(box.sum(1), 15)].mean(0)
            tint = ink - pixels[0, 0]
            nearest = min(palette, key=lambda n: np.abs((palette[n] - pixels[0, 0]) / 255 - tint / 255).sum())
            assert nearest == obj["color"], (sample["json"]["description"], ink)
    assert not (used["train"] & used["test"]) and not (used["val"] & used["test"])
    assert len(used["test"]) > 250  # the test scenes show most of the 300 test scans
    del scans


@pytest.mark.slow
def test_deterministic_by_seed(root, tmp_path):
    again = build_dataset("digit_scenes", tmp_path / "same", seed=0, progress=False)
    assert all(tar_bytes(again / s) == tar_bytes(root / s) for s in SPLITS)
