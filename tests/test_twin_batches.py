"""Twin batches (`data.batch_twins`): each sample brings the samples its caption's perturbations describe.

.venv/bin/pytest tests/test_twin_batches.py -q
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mmret.data.datamodule import RetrievalDataModule
from mmret.data.perturb import CaptionPerturber, caption_key, normalize
from mmret.data.twin_batches import TWIN_OF, TwinBatcher, raw_captions
from mmret.errors import UsageError
from tests.test_hard_negative_training import WORD_CLASSES, _composition_shards


def _raw(index: int, captions: list[str]) -> dict:
    return {"__key__": f"{index:06d}", "__shard__": "x.tar", "txt": "\n".join(captions).encode()}


def _scene_stream(seed: int = 0):
    """Endless raw samples of two-object captions (every ordered pair of WORD_CLASSES bindings, each drawn with
    its paraphrase), numbered so that each draw is a distinct sample."""
    objects = list(itertools.product(["red", "green", "blue"], ["circle", "square"]))
    pairs = list(itertools.permutations(objects, 2))
    rng = np.random.default_rng(seed)
    for index in itertools.count():
        (c1, s1), (c2, s2) = pairs[int(rng.integers(len(pairs)))]
        relation = ["left of", "above"][int(rng.integers(2))]
        yield _raw(
            index, [f"a {c1} {s1} {relation} a {c2} {s2}", f"the {c1} {s1} is {relation} the {c2} {s2}"]
        )


def _groups(batcher: TwinBatcher, count: int, batch_size: int, seed: int = 0) -> list[list[dict]]:
    """The first `count` samples of the batcher's stream, cut into anchor groups (a group = an anchor and the
    samples that were drawn as its twins; recomputed here from the captions)."""
    stream = batcher.stream(_scene_stream(seed), np.random.default_rng(seed), batch_size)
    return [next(stream) for _ in range(count)]


def test_twins_follow_their_anchor_and_are_perturbations_of_its_caption():
    perturber = CaptionPerturber(WORD_CLASSES)
    batcher = TwinBatcher(perturber, twins_per_sample=3, pool_size=200)
    samples = _groups(batcher, 16 * 40, batch_size=16)
    twins, swaps, anchor = 0, 0, None
    for position, raw in enumerate(samples):
        if TWIN_OF not in raw:
            anchor, members = raw, [frozenset(raw_captions(raw))]
            continue
        # a twin follows its anchor (or the anchor's other twins) inside the same batch of 16
        assert raw[TWIN_OF] == anchor["__key__"]
        assert position // 16 == samples.index(anchor) // 16
        captions = set(raw_captions(raw))
        tiers = batcher.twin_captions(raw_captions(anchor))
        assert captions & set().union(*tiers)  # one of its captions is a perturbation of the anchor's
        assert captions.isdisjoint(raw_captions(anchor))  # and none is the anchor's own
        assert frozenset(captions) not in members  # one sample per composition in a group
        members.append(frozenset(captions))
        twins += 1
        swaps += bool(captions & tiers[0])
    # Nearly every anchor finds 3 twins in a pool of 200 drawn from 60 compositions, most of them swaps.
    assert twins > 0.6 * len(samples)
    assert swaps > 0.4 * twins


def test_twin_batches_hold_more_swap_twins_than_shuffled_batches(tmp_path):
    directory, _ = _composition_shards(tmp_path / "c", held_out=("none", "none"))
    counts = {}
    for twins in (0, 3):
        data = RetrievalDataModule(train=str(directory), batch_size=12, num_workers=0, image_size=16,
                                   shuffle_buffer=30, batch_twins=twins, samples_per_epoch=240)  # fmt: skip
        data.setup("fit")
        perturber = CaptionPerturber(WORD_CLASSES)
        batcher = TwinBatcher(perturber, 1, 2)
        swap_pairs = 0
        for batch in data.train_dataloader():
            keys = [normalize(c) for c in batch["caption"]]
            for i, caption in enumerate(keys):
                tier0 = batcher.twin_captions([caption])[0]
                swap_pairs += sum(1 for j, other in enumerate(keys) if j != i and other in tier0)
            if twins:
                assert batch["text_key"].tolist() == [caption_key(c) for c in batch["caption"]]
                assert batch["caption_keys"].shape[0] == len(batch["caption"])
            else:
                assert "text_key" not in batch
        counts[twins] = swap_pairs
    assert counts[3] > 1.5 * counts[0], counts  # 30 compositions: random batches of 12 hold some already


def test_every_stream_sample_is_drawn_once():
    batcher = TwinBatcher(CaptionPerturber(WORD_CLASSES), twins_per_sample=2, pool_size=50)
    drawn = [int(raw["__key__"]) for raw in _groups(batcher, 500, batch_size=8)]
    assert len(set(drawn)) == len(drawn)
    # The pool holds 50 samples: the first 500 draws come from the first 550 of the stream.
    assert max(drawn) < 550


def test_same_seed_same_batches_and_groups_never_cross_a_batch_edge():
    batcher = TwinBatcher(CaptionPerturber(WORD_CLASSES), twins_per_sample=3, pool_size=100)
    first = [raw["__key__"] for raw in _groups(batcher, 300, batch_size=10, seed=3)]
    again = [raw["__key__"] for raw in _groups(batcher, 300, batch_size=10, seed=3)]
    assert first == again
    other = [raw["__key__"] for raw in _groups(batcher, 300, batch_size=10, seed=4)]
    assert first != other
    samples = _groups(batcher, 300, batch_size=10, seed=3)
    for start in range(0, 300, 10):
        assert TWIN_OF not in samples[start]  # every batch starts with an anchor
    assert sum(TWIN_OF in raw for raw in samples) > 150


def test_generic_strategies_find_twins_without_word_classes():
    batcher = TwinBatcher(CaptionPerturber(None), twins_per_sample=1, pool_size=10)
    captions = ["a dog on a sofa", "a sofa on a dog", "a cat under a table"]
    tiers = batcher.twin_captions([normalize(captions[0])])
    assert normalize(captions[1]) in tiers[0]  # swap_around_relation
    assert normalize(captions[2]) not in set().union(*tiers)


def test_bad_twin_settings_are_refused():
    with pytest.raises(UsageError, match="batch_twins"):
        RetrievalDataModule(dataset="shapes", batch_twins=-1)
    with pytest.raises(UsageError, match="shuffle_buffer"):
        RetrievalDataModule(dataset="shapes", batch_twins=2, shuffle_buffer=0)
    with pytest.raises(UsageError, match="twins_per_sample"):
        TwinBatcher(CaptionPerturber(None), twins_per_sample=0, pool_size=10)


def test_dual_encoder_masks_a_shared_caption_of_a_twin_batch():
    from mmret.training import DualEncoder

    torch.manual_seed(0)
    model = DualEncoder(model="test-vit-micro", warmup_steps=1)
    size = model.model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    captions = ["a red circle left of a blue square", "a blue circle left of a red square",
                "a red circle left of a blue square"]  # fmt: skip
    batch = {
        "image": torch.randn(3, 3, size, size),
        "text": model.tokenizer(captions),
        "sample_id": torch.tensor([0, 1, 2]),
        "caption": captions,
        "caption_keys": torch.tensor([[caption_key(c)] for c in captions]),
        "text_key": torch.tensor([caption_key(c) for c in captions]),
    }
    keys = model.caption_keys(batch)
    assert keys is not None
    image_emb, text_emb = model.encode_image(batch["image"]), model.encode_text(batch["text"])
    masked = model._loss(image_emb, text_emb, batch["sample_id"], None, keys)
    # Rows 0 and 2 share their caption: the same as giving them one sample id.
    by_id = model._loss(image_emb, text_emb, torch.tensor([0, 1, 0]))
    torch.testing.assert_close(masked, by_id)
    model.hparams.mask_shared_captions = False
    assert model.caption_keys(batch) is None
