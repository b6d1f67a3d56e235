"""Hard negatives in the dual-encoder losses: parity with sentence-transformers, masking, DDP and GradCache.

    .venv/bin/pytest tests/test_hard_negatives.py            # single process
    .venv/bin/pytest tests/test_hard_negatives.py -m ddp     # 2 gloo ranks

The outside reference is sentence-transformers' MultipleNegativesRankingLoss with negative columns: anchors
against [positives; every row's negatives], one cross-entropy per anchor. Our symmetric InfoNCE with hard
negatives is the mean of that loss with the images as anchors (text negatives) and with the captions as
anchors (image negatives). Dot-product similarity on normalised inputs: cos_sim would renormalise and project
the gradient, so the losses agree but the raw gradients would not be comparable.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from mmret.losses import HardNegatives, InfoNCELoss, SigLIPLoss
from mmret.training.gradcache import gradcache_backward
from tests.ddp_helpers import run_ddp
from tests.test_gradcache import TinyTowers, _data, _grads

TOL = {"rtol": 1e-6, "atol": 1e-6}
B, D, KT, KI = 6, 8, 3, 2


def _unit(*shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def _embeddings(seed=0, rows=B):
    generator = torch.Generator().manual_seed(seed)
    return (
        _unit(rows, D, generator=generator),
        _unit(rows, D, generator=generator),
        _unit(rows, KT, D, generator=generator),
        _unit(rows, KI, D, generator=generator),
    )


def _mnrl(scale: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking import (
            MultipleNegativesRankingLoss,
        )
        from sentence_transformers.util import dot_score
    return MultipleNegativesRankingLoss(model=None, scale=scale, similarity_fct=dot_score)


def _grad(loss_fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = loss_fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def test_infonce_with_hard_negatives_equals_sentence_transformers_mnrl():
    image, text, text_neg, image_neg = _embeddings()
    scale = 17.0
    mnrl = _mnrl(scale)

    def ours(i, t, tn, im):
        return InfoNCELoss()(
            i, t, torch.tensor(scale, dtype=torch.float64), negatives=HardNegatives(text=tn, image=im)
        )

    def reference(i, t, tn, im):
        image_anchor = mnrl.compute_loss_from_embeddings([i, t, *tn.unbind(1)], None)
        text_anchor = mnrl.compute_loss_from_embeddings([t, i, *im.unbind(1)], None)
        return (image_anchor + text_anchor) / 2

    loss, grads = _grad(ours, image, text, text_neg, image_neg)
    ref_loss, ref_grads = _grad(reference, image, text, text_neg, image_neg)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for name, ours_g, ref_g in zip(("image", "text", "text_neg", "image_neg"), grads, ref_grads):
        torch.testing.assert_close(ours_g, ref_g, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    # and the negatives matter: without them the loss is lower
    assert InfoNCELoss()(image, text, torch.tensor(scale, dtype=torch.float64)) < loss


def test_padding_and_false_negatives_are_masked():
    image, text, text_neg, image_neg = _embeddings(seed=1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    loss = InfoNCELoss()
    sample_ids = torch.arange(B)
    # Padding: invalid negatives count for nothing, whatever their embedding.
    text_valid = torch.ones(B, KT, dtype=torch.bool)
    text_valid[:, -1] = False
    image_valid = torch.ones(B, KI, dtype=torch.bool)
    image_valid[2:, 1] = False
    padded = loss(image, text, scale, sample_ids, HardNegatives(
        text=text_neg, text_valid=text_valid, image=image_neg, image_valid=image_valid))  # fmt: skip
    manual_text = torch.cat([text_neg[:, :-1].reshape(-1, D)])
    manual_image = torch.cat([image_neg[:, 0], image_neg[:2, 1]])
    logits_i = scale * image @ torch.cat([text, manual_text]).T
    logits_t = scale * text @ torch.cat([image, manual_image]).T
    labels = torch.arange(B)
    expected = (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2
    torch.testing.assert_close(padded, expected, **TOL)

    # False negatives: text negative (row 0, k 0) is a caption of image 3 -> not a negative for row 3 only;
    # image negative (row 1, k 0) is image 4 itself -> not a negative for caption row 4 only.
    text_keys = torch.arange(B * KT).reshape(B, KT) + 1000
    row_text_keys = torch.full((B, 2), -1)
    row_text_keys[3] = torch.tensor([7, 1000])
    image_ids = torch.arange(B * KI).reshape(B, KI) + 100
    image_ids[1, 0] = 4
    masked = loss(image, text, scale, sample_ids, HardNegatives(
        text=text_neg, text_keys=text_keys, row_text_keys=row_text_keys, image=image_neg, image_ids=image_ids))  # fmt: skip
    logits_i = scale * image @ torch.cat([text, text_neg.reshape(-1, D)]).T
    logits_t = scale * text @ torch.cat([image, image_neg.reshape(-1, D)]).T
    logits_i[3, B + 0] = float("-inf")
    logits_t[4, B + 2 * 1 + 0] = float("-inf")
    expected = (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2
    torch.testing.assert_close(masked, expected, **TOL)
    unmasked = loss(image, text, scale, sample_ids, HardNegatives(text=text_neg, image=image_neg))
    assert not torch.allclose(masked, unmasked)


def test_siglip_hard_negatives_are_extra_negative_pairs():
    image, text, text_neg, image_neg = _embeddings(seed=2)
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    ours = SigLIPLoss()(image, text, scale, bias, negatives=HardNegatives(text=text_neg, image=image_neg))
    base = SigLIPLoss()(image, text, scale, bias)
    extra = -F.logsigmoid(-(scale * image @ text_neg.reshape(-1, D).T + bias)).sum()
    extra = extra - F.logsigmoid(-(scale * text @ image_neg.reshape(-1, D).T + bias)).sum()
    torch.testing.assert_close(ours, base + extra / B, **TOL)
    with pytest.raises(ValueError, match="gather"):
        # ring exchange has no hard-negative path: refused rather than silently ignored under DDP
        loss = SigLIPLoss(dist_impl="ring")
        import mmret.distributed as dist_module

        original = dist_module.get_world_size
        dist_module.get_world_size = lambda: 2
        try:
            loss(image, text, scale, bias, negatives=HardNegatives(text=text_neg))
        finally:
            dist_module.get_world_size = original


def test_hard_negatives_check_their_shapes():
    with pytest.raises(ValueError, match=r"\[B, K, D\]"):
        HardNegatives(text=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="text_valid"):
        HardNegatives(text=torch.zeros(3, 2, 4), text_valid=torch.ones(3, 3, dtype=torch.bool))


# --- GradCache ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_gradcache_with_hard_negatives_equals_the_plain_step(kind):
    """Dropout off, so the plain step (one graph over everything) is the reference."""
    images, texts, sample_ids = _data(rows=10)
    neg_images, neg_texts, _ = _data(rows=20, seed=5)  # 2 image and 2 text negatives per row
    model = TinyTowers(dropout=0.0, with_bias=kind == "siglip")
    valid = torch.ones(10, 2, dtype=torch.bool)
    valid[-1, 1] = False
    ids = torch.arange(20).reshape(10, 2) + 100
    ids[0, 0] = sample_ids[5]  # row 5's own image mined for caption 0: masked for row 5

    def loss_fn(image_emb, text_emb, text_neg, image_neg):
        negatives = HardNegatives(
            text=text_neg.reshape(10, 2, -1),
            text_valid=valid,
            image=image_neg.reshape(10, 2, -1),
            image_ids=ids,
        )
        if kind == "infonce":
            return InfoNCELoss()(image_emb, text_emb, model.logit_scale.exp(), sample_ids, negatives)
        return SigLIPLoss()(
            image_emb, text_emb, model.logit_scale.exp(), model.logit_bias, sample_ids, negatives
        )

    loss = loss_fn(
        model.encode_image(images),
        model.encode_text(texts),
        model.encode_text(neg_texts),
        model.encode_image(neg_images),
    )
    loss.backward()
    reference = _grads(model)
    model.zero_grad(set_to_none=True)
    out = gradcache_backward(
        model.encode_image,
        model.encode_text,
        images,
        texts,
        loss_fn,
        chunk_size=4,
        extra_inputs=[(model.encode_text, neg_texts), (model.encode_image, neg_images)],
    )
    torch.testing.assert_close(out.loss, loss.detach(), **TOL)
    ours = _grads(model)
    assert ours.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(ours[name], grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_gradcache_hard_negatives_replay_dropout():
    """With dropout on, the cached negatives' re-encoding draws the same masks: equal to the chunk-ordered graph."""
    images, texts, _ = _data(rows=8)
    neg_texts = _data(rows=8, seed=9)[1]
    model = TinyTowers(dropout=0.3)
    loss = InfoNCELoss()

    def loss_fn(i, t, tn):
        return loss(i, t, model.logit_scale.exp(), negatives=HardNegatives(text=tn.reshape(8, 1, -1)))

    torch.manual_seed(3)
    # Reference in GradCache's encoding order: negatives' chunks first, then (image, text) chunk pairs.
    neg_emb = torch.cat([model.encode_text({"input_ids": c}) for c in neg_texts["input_ids"].split(4)])
    parts = [(model.encode_image(i), model.encode_text({"input_ids": t}))
             for i, t in zip(images.split(4), texts["input_ids"].split(4))]  # fmt: skip
    reference_loss = loss_fn(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), neg_emb)
    reference_loss.backward()
    reference = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    out = gradcache_backward(
        model.encode_image,
        model.encode_text,
        images,
        texts,
        loss_fn,
        4,
        extra_inputs=[(model.encode_text, neg_texts)],
    )
    torch.testing.assert_close(out.loss, reference_loss.detach(), rtol=1e-5, atol=1e-5)
    for name, grad in reference.items():
        torch.testing.assert_close(_grads(model)[name], grad, rtol=1e-5, atol=1e-5)


# --- two gloo ranks -----------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world_size: int) -> None:
    n = world_size * B
    image, text, text_neg, image_neg = _embeddings(seed=4, rows=n)
    ids = torch.arange(n) % 5  # duplicate ids within and across ranks
    image_ids = (torch.arange(n * KI).reshape(n, KI) + 50) % 60
    image_ids[0, 0] = ids[B + 1]  # rank 1's row 1 image mined for rank 0's caption 0
    text_keys = torch.arange(n * KT).reshape(n, KT)
    row_keys = torch.full((n, 1), -1)
    row_keys[B + 2, 0] = text_keys[1, 2]  # rank 0's text negative describes rank 1's row 2
    valid = torch.ones(n, KT, dtype=torch.bool)
    valid[3, 0] = False
    scale = torch.tensor(12.0, dtype=torch.float64)
    local = slice(rank * B, (rank + 1) * B)

    for kind in ("infonce", "infonce_full", "siglip"):

        def loss_fn(i, t, tn, im, rows=None, kind=kind):
            rows = rows if rows is not None else local
            negatives = HardNegatives(
                text=tn, text_valid=valid[rows], text_keys=text_keys[rows], row_text_keys=row_keys[rows],
                image=im, image_ids=image_ids[rows],
            )  # fmt: skip
            if kind == "siglip":
                return SigLIPLoss()(
                    i, t, scale, torch.tensor(-2.0, dtype=torch.float64), ids[rows], negatives
                )
            return InfoNCELoss(local_loss=kind == "infonce")(i, t, scale, ids[rows], negatives)

        from mmret import distributed

        # Reference: one process on the concatenated batch (no process group in the loss).
        get_world_size = distributed.get_world_size
        distributed.get_world_size = lambda: 1
        try:
            ref_loss, ref_grads = _grad(
                lambda *x: loss_fn(*x, rows=slice(0, n)), image, text, text_neg, image_neg
            )
        finally:
            distributed.get_world_size = get_world_size
        loss, grads = _grad(loss_fn, image[local], text[local], text_neg[local], image_neg[local])
        # Each rank's loss is its rows' share (or, full matrix, the whole loss on every rank) and the gathered
        # backward sums over ranks, so a rank's embeddings get world_size x the reference gradient; DDP's mean
        # over ranks of the parameter gradients then gives exactly the single-process gradient.
        total = loss.clone()
        torch.distributed.all_reduce(total)
        torch.testing.assert_close(total / world_size, ref_loss, **TOL)  # full matrix: equal on every rank
        for name, g, ref in zip(("image", "text", "text_neg", "image_neg"), grads, ref_grads):
            torch.testing.assert_close(
                g, ref[local] * world_size, **TOL, msg=lambda m, n=name, k=kind: f"{k} rank {rank} {n}: {m}"
            )


@pytest.mark.ddp
def test_two_ranks_with_hard_negatives_equal_one_process_on_the_concatenated_batch():
    run_ddp(_ddp_worker, world_size=2)
