"""Offline mined negatives in reranker training: the data module attaches them, the CrossEncoder scores them.

.venv/bin/pytest tests/test_mined_negatives.py -q            # data module + loss against a hand computation
.venv/bin/pytest tests/test_mined_negatives.py -q -m slow    # `mmret mine` on digits -> `mmret fit` a reranker
"""

from __future__ import annotations

import json

import pytest
import torch

from mmret.cli import main
from mmret.data.datamodule import RetrievalDataModule, default_image_transform
from mmret.data.mined_negatives import FORMAT
from mmret.data.samples import SkipCounter, decode_sample, iter_shard
from mmret.errors import UsageError
from mmret.evaluation.retrieval import caption_hash
from mmret.losses import listwise_infonce_loss
from mmret.training import CrossEncoder
from tests.fit_args import CROSS_ENCODER, fit_argv


def split_samples(directory):
    """id -> decoded sample of every sample of a shard directory."""
    samples = {}
    for shard in sorted(directory.glob("*.tar")):
        for raw in iter_shard(str(shard), SkipCounter()):
            sample = decode_sample(raw)
            samples[sample["sample_id"]] = sample
    return samples


def write_mined(path, records):
    header = {"format": FORMAT, "version": 1, "model": "hand-made", "data": "", "options": {}, "counts": {}}
    path.write_text("\n".join(json.dumps(line) for line in [header, *records]) + "\n")


@pytest.fixture(scope="module")
def hand_mined(digits_root, tmp_path_factory):
    """A mined file over digits/val: for every caption, the 3 images of the next digit class; for every image,
    two captions of other classes (one image gets only one, to exercise the padding)."""
    samples = split_samples(digits_root / "val")
    by_label: dict[int, list[int]] = {}
    for sample_id, sample in sorted(samples.items()):
        by_label.setdefault(sample["label"], []).append(sample_id)
    records, captions_of_label = [], {}
    for sample in samples.values():
        for caption in sample["captions"]:
            captions_of_label.setdefault(sample["label"], set()).add(caption)
    for label, captions in captions_of_label.items():
        for caption in sorted(captions):
            negatives = by_label[(label + 1) % 10][:3]
            records.append({"direction": "text_to_image", "query": caption, "negative_ids": negatives})
    first = min(samples)
    for sample_id, sample in samples.items():
        others = sorted(captions_of_label[(sample["label"] + 3) % 10])[:2]
        if sample_id == first:
            others = others[:1]
        records.append({"direction": "image_to_text", "query_id": sample_id, "negative_captions": others})
    path = tmp_path_factory.mktemp("mined") / "mined.jsonl"
    write_mined(path, records)
    return path, samples, by_label


def test_training_batches_carry_the_mined_negatives_of_each_sample(digits_root, hand_mined):
    path, samples, by_label = hand_mined
    module = RetrievalDataModule(train=str(digits_root / "val"), batch_size=16, num_workers=0,
                                 mined_negatives=str(path), mined_per_sample=2, image_size=32)  # fmt: skip
    module.setup("fit")
    transform = default_image_transform(32)
    for batches, batch in enumerate(module.train_dataloader(), start=1):
        assert batch["mined_image"].shape == (16, 2, 3, 32, 32)
        assert batch["mined_text"].shape[0] == 16 * 2
        for row in range(16):
            label = int(batch["label"][row])
            sample_id = int(batch["sample_id"][row])
            ids = batch["mined_image_id"][row][batch["mined_image_valid"][row]].tolist()
            assert len(ids) == 2 and set(ids) <= set(by_label[(label + 1) % 10][:3])
            for column, negative_id in enumerate(ids):  # the very image of that id, transformed alike
                expected = transform(samples[negative_id]["image"])
                torch.testing.assert_close(batch["mined_image"][row, column], expected)
            captions = [c for c, ok in zip(batch["mined_caption"][row], batch["mined_text_valid"][row]) if ok]
            expected_count = 1 if sample_id == min(samples) else 2
            assert len(captions) == expected_count
            allowed = {c for s in samples.values() if s["label"] == (label + 3) % 10 for c in s["captions"]}
            assert set(captions) <= allowed
            assert not set(captions) & set(samples[sample_id]["captions"])
        if batches == 3:
            break


def test_a_mined_file_that_is_not_one_is_refused(digits_root, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    module = RetrievalDataModule(train=str(digits_root / "val"), batch_size=4, num_workers=0,
                                 mined_negatives=str(bad))  # fmt: skip
    module.setup("fit")
    with pytest.raises(UsageError, match="not a `mmret mine` output"):
        module.train_dataloader()
    with pytest.raises(UsageError, match="mined_per_sample"):
        RetrievalDataModule(train=str(digits_root / "val"), mined_negatives=str(bad), mined_per_sample=0)


def test_training_step_scores_mined_negatives_beside_the_in_batch_ones():
    """The text -> image loss equals a hand computation over [positive, hardest in-batch, mined images]."""
    torch.manual_seed(0)
    module = CrossEncoder(model="test-vit-micro", fusion_width=32, fusion_layers=1, fusion_heads=2,
                          num_negatives=2, negative_sampling="hardest", directions="text_to_image")  # fmt: skip
    captions = ["a red circle", "a blue square", "a red circle", "a green diamond"]
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    mined = torch.randn(4, 2, 3, 32, 32, generator=generator)
    mined_valid = torch.tensor([[True, True], [True, False], [False, False], [True, True]])
    batch = {"image": images, "text": module.tokenizer(captions), "sample_id": torch.arange(4),
             "caption": captions, "mined_image": mined, "mined_image_valid": mined_valid}  # fmt: skip
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        text_emb, _, _ = module.encode_texts(captions)
        image_emb, _ = module.encode_images(images)
        similarity = (text_emb @ image_emb.t()).fill_diagonal_(float("-inf"))
        negatives = similarity.topk(2, dim=1).indices  # [4, 2]
        columns = torch.cat([torch.arange(4)[:, None], negatives], dim=1)  # [4, 3]
        rows = []
        for query in range(4):
            in_batch = module.score([captions[query]] * 3, images[columns[query]])
            from_mined = module.score([captions[query]] * 2, mined[query])
            rows.append(torch.cat([in_batch, from_mined]))
        scores = torch.stack(rows)  # [4, 5]
        hashes = torch.tensor([caption_hash(c) for c in captions])
        positive = torch.zeros(4, 5, dtype=torch.bool)
        positive[:, :3] = hashes[columns] == hashes[:, None]
        valid = torch.cat([torch.ones(4, 3, dtype=torch.bool), mined_valid], dim=1)
        expected = listwise_infonce_loss(scores, positive, 1.0, valid)
        without = module.training_step({k: v for k, v in batch.items() if not k.startswith("mined")}, 0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert abs(loss.item() - without.item()) > 1e-4  # the mined negatives did enter the loss


@pytest.mark.slow
def test_mine_then_fit_a_reranker_on_the_mined_negatives(trained_checkpoint, digits_root, tmp_path):
    mined = tmp_path / "mined.jsonl"
    assert main(["mine", "--model", str(trained_checkpoint), "--data", str(digits_root), "--split", "train",
                 "--output", str(mined), "--num-negatives", "4", "--range-max", "20", "--device", "cpu",
                 "--num-workers", "0"]) == 0  # fmt: skip
    module = RetrievalDataModule(train=str(digits_root / "train"), batch_size=8, num_workers=0,
                                 mined_negatives=str(mined), mined_per_sample=2, image_size=32)  # fmt: skip
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    samples = split_samples(digits_root / "train")
    for row in range(8):  # mined images never carry the row's caption: `mmret mine` excluded positives
        for negative_id in batch["mined_image_id"][row][batch["mined_image_valid"][row]].tolist():
            assert batch["caption"][row] not in samples[negative_id]["captions"]
    assert bool(batch["mined_image_valid"].any()) and bool(batch["mined_text_valid"].any())
    run_dir = tmp_path / "reranker"
    reranker_args = {"dual_encoder": trained_checkpoint, "fusion_width": 32, "fusion_layers": 1,
                     "fusion_heads": 2, "num_negatives": 2, "warmup_steps": 1}  # fmt: skip
    assert main(fit_argv(module=CROSS_ENCODER, model=None, model_args=reranker_args, train=digits_root / "train",
                         data_args={"mined_negatives": mined, "mined_per_sample": 2}, samples_per_epoch=16,
                         batch_size=8, num_workers=1, max_epochs=1, limit_val_batches=0,
                         run_dir=run_dir)) == 0  # fmt: skip
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
