"""Hard negatives reach training: the stream makes perturbed captions, the DualEncoder and the reranker use them.

.venv/bin/pytest tests/test_hard_negative_training.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmret.data.datamodule import RetrievalDataModule
from mmret.data.perturb import CaptionPerturber, caption_key, normalize
from mmret.errors import UsageError
from mmret.training import DualEncoder
from tests.test_dual_encoder import GradientRecorder, fit_steps

WORD_CLASSES = {
    "color": {"role": "attribute", "words": ["red", "green", "blue"]},
    "shape": {"role": "object", "words": ["circle", "square"]},
    "relation": {"role": "relation", "words": ["left of", "above"]},
}


def _perturbed_batch(model: DualEncoder, batch_size: int = 8, k: int = 2, seed: int = 0) -> dict:
    """A batch with images, captions of two coloured shapes, and k perturbations of each caption."""
    rng = np.random.default_rng(seed)
    perturber = CaptionPerturber(WORD_CLASSES)
    colors, shapes = ["red", "green", "blue"], ["circle", "square"]
    captions = [
        f"a {colors[i % 3]} {shapes[i % 2]} left of a {colors[(i + 1) % 3]} {shapes[(i + 1) % 2]}"
        for i in range(batch_size)
    ]
    perturbed = [perturber.sample(c, [c], rng, k) for c in captions]
    texts = [p.text for row in perturbed for p in row]
    generator = torch.Generator().manual_seed(seed)
    size = model.model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    return {
        "image": torch.randn(batch_size, 3, size, size, generator=generator),
        "text": model.tokenizer(captions),
        "sample_id": torch.arange(batch_size) + 10 * seed,
        "label": torch.full((batch_size,), -1),
        "caption": captions,
        "perturbed_text": model.tokenizer(texts),
        "perturbed_valid": torch.ones(batch_size, k, dtype=torch.bool),
        "perturbed_key": torch.tensor([[caption_key(p.text) for p in row] for row in perturbed]),
        "caption_keys": torch.tensor([[caption_key(c)] for c in captions]),
        "text_key": torch.tensor([caption_key(c) for c in captions]),  # rows i and i + 6 share a caption
        "mined_image": torch.randn(batch_size, 1, 3, size, size, generator=generator),
        "mined_image_valid": torch.ones(batch_size, 1, dtype=torch.bool),
        "mined_image_id": (torch.arange(batch_size)[:, None] + 1) % batch_size + 10 * seed,
    }


def test_train_stream_carries_perturbed_captions(tmp_path):
    from tests.shard_fixtures import write_shards

    directory = write_shards(tmp_path / "toy", num_samples=24, samples_per_shard=12)
    data = RetrievalDataModule(
        train=str(directory),
        batch_size=6,
        num_workers=0,
        caption_negatives=3,
        image_size=32,
        shuffle_buffer=0,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["perturbed_valid"].shape == (6, 3) and batch["perturbed_key"].shape == (6, 3)
    assert batch["perturbed_text"].shape[0] == 18
    assert batch["caption_keys"].shape[0] == 6
    for caption, row, types, valid in zip(
        batch["caption"], batch["perturbed_caption"], batch["perturbed_type"], batch["perturbed_valid"]
    ):
        made = [text for text, ok in zip(row, valid) if ok]
        assert made, caption  # the generic strategies apply to any caption of several words
        assert normalize(caption) not in {normalize(t) for t in made}
        assert all(
            t in ("swap_words", "shuffle", "swap_around_relation") for t, ok in zip(types, valid) if ok
        )


def test_data_module_refuses_bad_perturbation_settings():
    with pytest.raises(UsageError, match="caption_negatives"):
        RetrievalDataModule(dataset="shapes", caption_negatives=-1)
    with pytest.raises(UsageError, match="perturbation types"):
        RetrievalDataModule(dataset="shapes", caption_negatives=2, perturbation_types=["swap_colours"])
    with pytest.raises(UsageError, match="role"):
        RetrievalDataModule(
            dataset="shapes",
            caption_negatives=2,
            word_classes={"color": {"role": "hue", "words": ["a", "b"]}},
        )


def test_dual_encoder_uses_the_batch_hard_negatives_and_gradcache_agrees():
    """Hard negatives change the loss; GradCache over them (and the batch's caption keys) gives the plain
    step's gradients."""
    torch.manual_seed(0)
    probe = DualEncoder(model="test-vit-micro", warmup_steps=1)
    batch = _perturbed_batch(probe)
    with torch.no_grad():
        image_emb, text_emb = probe.encode_image(batch["image"]), probe.encode_text(batch["text"])
        inputs = probe.hard_negative_inputs(batch)
        assert [item.kind for item in inputs] == ["text", "image"]
        negatives = probe._negatives(inputs, [probe._encoder_of(i.kind)(i.data) for i in inputs], batch)
        with_negatives = probe._loss(image_emb, text_emb, batch["sample_id"], negatives)
        without = probe._loss(image_emb, text_emb, batch["sample_id"])
        keys = probe.caption_keys(batch)
        masked = probe._loss(image_emb, text_emb, batch["sample_id"], negatives, keys)
    assert with_negatives > without
    assert masked < with_negatives  # rows sharing a caption left each other's denominators
    off = DualEncoder(model="test-vit-micro", hard_negatives=False)
    assert off.hard_negative_inputs(batch) == []

    batches, recorded = None, []
    for chunk in (None, 3):
        torch.manual_seed(0)
        model = DualEncoder(model="test-vit-micro", gradcache_chunk_size=chunk, warmup_steps=1, lr=1e-3)
        batches = batches or [_perturbed_batch(model, seed=s) for s in range(2)]
        recorder = GradientRecorder()
        fit_steps(model, batches, callbacks=[recorder])
        recorded.append(recorder.steps)
    plain, cached = recorded
    assert len(plain) == len(cached) == 2
    for plain_step, cached_step in zip(plain, cached):
        assert plain_step.keys() == cached_step.keys()
        for name, grad in plain_step.items():
            torch.testing.assert_close(cached_step[name], grad, rtol=1e-4, atol=2e-5)  # float32 sums


def test_cross_encoder_scores_perturbed_captions_as_image_negatives():
    from mmret.training import CrossEncoder

    torch.manual_seed(0)
    model = CrossEncoder(model="test-vit-micro", num_negatives=1, contrastive_weight=1.0, warmup_steps=1)
    batch = _perturbed_batch(DualEncoder(model="test-vit-micro"), batch_size=6, k=2)
    batch["text"] = model.tokenizer(batch["caption"])
    for key in ("mined_image", "mined_image_valid", "mined_image_id"):
        batch.pop(key)
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    with_perturbed = model.training_step(batch, 0)
    torch.manual_seed(0)
    plain = {k: v for k, v in batch.items() if not k.startswith("perturbed") and k != "caption_keys"}
    logged_with = dict(logged)
    model.training_step(plain, 0)
    # The image->text listwise loss has two more (hard) negatives per image: it changes.
    assert logged_with["train/loss_image_to_text"] != pytest.approx(logged["train/loss_image_to_text"])
    assert torch.isfinite(with_perturbed)


def test_cross_encoder_contrastive_term_masks_shared_captions():
    """Rows i and i + 6 of the batch share a caption: masked (the default) they are not each other's
    negatives, so the contrastive loss is strictly lower; `mask_shared_captions=False` or a batch without
    caption keys gives the unmasked loss."""
    from mmret.training import CrossEncoder

    def contrastive_loss(mask: bool, drop_keys: bool = False) -> float:
        torch.manual_seed(0)
        model = CrossEncoder(
            model="test-vit-micro", num_negatives=1, contrastive_weight=1.0, warmup_steps=1,
            mask_shared_captions=mask,
        )  # fmt: skip
        batch = _perturbed_batch(DualEncoder(model="test-vit-micro"), batch_size=8, k=1)
        batch["text"] = model.tokenizer(batch["caption"])
        dropped = {"mined_image", "mined_image_valid", "mined_image_id", "perturbed_text", "perturbed_valid"}
        dropped |= {"perturbed_key"} | ({"text_key", "caption_keys"} if drop_keys else set())
        batch = {k: v for k, v in batch.items() if k not in dropped}
        logged = {}
        model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
        torch.manual_seed(1)
        model.training_step(batch, 0)
        return logged["train/loss_contrastive"]

    masked, unmasked = contrastive_loss(True), contrastive_loss(False)
    assert masked < unmasked - 1e-4
    assert contrastive_loss(True, drop_keys=True) == pytest.approx(unmasked, rel=1e-6)


def _composition_shards(directory, held_out=("blue", "circle")):
    """Two-object captions over every binding of WORD_CLASSES but `held_out`, which no caption shows."""
    import io
    import itertools
    import json

    import webdataset as wds
    from PIL import Image

    objects = [o for o in itertools.product(["red", "green", "blue"], ["circle", "square"]) if o != held_out]
    captions = [f"a {a[0]} {a[1]} left of a {b[0]} {b[1]}" for a, b in itertools.permutations(objects, 2)]
    directory.mkdir(parents=True)
    with wds.TarWriter(str(directory / "00000.tar")) as writer:
        for index, caption in enumerate(captions):
            buffer = io.BytesIO()
            Image.new("RGB", (16, 16), (index * 9 % 256, 80, 160)).save(buffer, format="JPEG")
            writer.write({"__key__": f"{index:06d}", "jpg": buffer.getvalue(), "txt": caption,
                          "json": json.dumps({"id": index, "captions": [caption]})})  # fmt: skip
    info = {"name": "compositions", "num_samples": len(captions), "shards": ["00000.tar"],
            "shard_sizes": [len(captions)], "skipped": {}, "word_classes": WORD_CLASSES}  # fmt: skip
    (directory / "dataset.json").write_text(json.dumps(info))
    return directory, captions


@pytest.mark.parametrize("known_only", [False, True])
def test_known_only_negatives_are_earlier_training_captions(tmp_path, known_only):
    directory, captions = _composition_shards(tmp_path / "c")
    data = RetrievalDataModule(train=str(directory), batch_size=5, num_workers=0, caption_negatives=3,
                               image_size=16, shuffle_buffer=4, negatives_known_only=known_only)  # fmt: skip
    data.setup("fit")
    seen: set[str] = set()
    made, held_out = 0, 0
    for batch in data.train_dataloader():
        seen |= {normalize(c) for c in batch["caption"]}
        for row, valid in zip(batch["perturbed_caption"], batch["perturbed_valid"]):
            for text, ok in zip(row, valid):
                if ok:
                    made += 1
                    held_out += "blue circle" in text
                    if known_only:
                        assert normalize(text) in seen, text  # a caption of this batch or an earlier one
    assert made > 0
    # unfiltered, swaps and replacements make the composition the training data never shows
    assert (held_out == 0) if known_only else (held_out > 0)


def test_sample_with_known_keeps_only_known_captions():
    perturber = CaptionPerturber(WORD_CLASSES)
    caption = "a red circle left of a green square"
    known = {
        normalize("a green circle left of a red square"),
        normalize("a green square left of a red circle"),
    }
    rng = np.random.default_rng(0)
    out = perturber.sample(caption, [caption], rng, 4, known)
    assert {normalize(p.text) for p in out} == known
    assert perturber.sample(caption, [caption], rng, 4, set()) == []
