"""Matryoshka embeddings: `mmret.losses.MatryoshkaLoss` and `DualEncoder(matryoshka_dims=...)`.

The loss at one dim is the plain loss on the truncated, re-normalised embeddings (hard negatives truncated too);
dims [D] is the plain loss; gradients reach every coordinate; bad dims are one-line usage errors; a tiny
`mmret fit` trains and logs validation metrics at every trained dim.

    .venv/bin/pytest tests/test_matryoshka.py -q
"""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from mmret.cli import main
from mmret.errors import UsageError
from mmret.losses import HardNegatives, InfoNCELoss, MatryoshkaLoss, SigLIPLoss, truncate_embeddings
from mmret.training import DualEncoder
from tests.fit_args import DUAL_ENCODER, fit_argv

B, D = 6, 16


def raw_embeddings(seed: int = 0, rows: int = B, width: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    text = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    return image, text


def call(loss, image, text, kind: str, **kwargs):
    scale = torch.tensor(10.0, dtype=torch.float64)
    if kind == "siglip":
        return loss(image, text, scale, torch.tensor(-5.0, dtype=torch.float64), **kwargs)
    return loss(image, text, scale, **kwargs)


def inner(kind: str):
    return InfoNCELoss() if kind == "infonce" else SigLIPLoss()


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
@pytest.mark.parametrize("dim", [16, 8, 3])
def test_single_dim_is_the_plain_loss_on_truncated_normalised_embeddings(kind, dim):
    image, text = raw_embeddings()
    ids = torch.tensor([0, 1, 1, 2, 3, 4])
    got = call(MatryoshkaLoss(inner(kind), [dim]), image, text, kind, sample_ids=ids)
    want = call(
        inner(kind),
        F.normalize(image[:, :dim], dim=-1),
        F.normalize(text[:, :dim], dim=-1),
        kind,
        sample_ids=ids,
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_already_normalised_input_gives_the_same_loss(kind):
    image, text = raw_embeddings(1)
    loss = MatryoshkaLoss(inner(kind), [16, 8, 4], [1.0, 0.5, 0.25])
    raw = call(loss, image, text, kind)
    normalised = call(loss, F.normalize(image, dim=-1), F.normalize(text, dim=-1), kind)
    torch.testing.assert_close(raw, normalised, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_full_dim_only_is_the_plain_loss(kind):
    image, text = (F.normalize(t, dim=-1) for t in raw_embeddings(2))
    got = call(MatryoshkaLoss(inner(kind), [D]), image, text, kind)
    torch.testing.assert_close(got, call(inner(kind), image, text, kind), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_weighted_sum_over_dims_with_hard_negatives(kind):
    image, text = raw_embeddings(3)
    generator = torch.Generator().manual_seed(4)
    negatives = HardNegatives(
        text=torch.randn(B, 2, D, generator=generator, dtype=torch.float64),
        text_valid=torch.tensor([[True, False]] * B),
        image=torch.randn(B, 1, D, generator=generator, dtype=torch.float64),
        image_valid=torch.ones(B, 1, dtype=torch.bool),
        image_ids=torch.full((B, 1), 99),
    )
    dims, weights = [16, 8, 4], [1.0, 0.5, 2.0]
    got = call(MatryoshkaLoss(inner(kind), dims, weights), image, text, kind, negatives=negatives)
    want = sum(
        weight
        * call(
            inner(kind),
            truncate_embeddings(image, dim),
            truncate_embeddings(text, dim),
            kind,
            negatives=negatives.with_embeddings(
                truncate_embeddings(negatives.text, dim), truncate_embeddings(negatives.image, dim)
            ),
        )
        for dim, weight in zip(dims, weights)
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_gradients_flow_to_every_coordinate_and_differ_from_the_plain_loss():
    image, text = (t.requires_grad_() for t in raw_embeddings(5))
    call(MatryoshkaLoss(InfoNCELoss(), [D, 8, 4]), image, text, "infonce").backward()
    assert image.grad is not None and text.grad is not None
    assert torch.isfinite(image.grad).all() and bool((image.grad[:, :4] != 0).any())
    matryoshka_grad = image.grad.clone()
    image.grad = None
    call(InfoNCELoss(), F.normalize(image, dim=-1), F.normalize(text, dim=-1), "infonce").backward()
    assert not torch.allclose(matryoshka_grad, image.grad)


def test_gradcheck_float64():
    image, text = (t[:4, :6].clone().requires_grad_() for t in raw_embeddings(6))
    loss = MatryoshkaLoss(InfoNCELoss(), [6, 3], [1.0, 0.5])
    scale = torch.tensor(5.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda i, t: loss(i, t, scale), (image, text))


def test_loss_refuses_bad_dims():
    with pytest.raises(ValueError, match="decreasing"):
        MatryoshkaLoss(InfoNCELoss(), [8, 16])
    with pytest.raises(ValueError, match="weights"):
        MatryoshkaLoss(InfoNCELoss(), [8, 4], [1.0])
    image, text = raw_embeddings()
    with pytest.raises(ValueError, match="width"):
        call(MatryoshkaLoss(InfoNCELoss(), [32, 8]), image, text, "infonce")


def test_dual_encoder_adds_the_full_width_in_front():
    model = DualEncoder(model="test-vit-micro", matryoshka_dims=[16, 8], matryoshka_weights=[0.5, 0.25])
    assert model.matryoshka == [(32, 1.0), (16, 0.5), (8, 0.25)]
    assert isinstance(model.loss_fn, MatryoshkaLoss) and model.loss_fn.dims == (32, 16, 8)
    assert DualEncoder(model="test-vit-micro", matryoshka_dims=[32, 8]).matryoshka == [(32, 1.0), (8, 1.0)]
    assert DualEncoder(model="test-vit-micro").matryoshka == []


@pytest.mark.parametrize(
    "dims, weights, message",
    [
        ([64, 16], None, "embedding width is 32"),
        ([8, 16], None, "strictly decreasing"),
        ([16, 16], None, "strictly decreasing"),
        ([16, 0], None, "positive"),
        ([], None, "empty"),
        ([16, 8], [1.0], "2 model.matryoshka_dims"),
        (None, [1.0], "without model.matryoshka_dims"),
    ],
)
def test_dual_encoder_refuses_bad_dims_in_one_line(dims, weights, message):
    with pytest.raises(UsageError, match=message) as error:
        DualEncoder(model="test-vit-micro", matryoshka_dims=dims, matryoshka_weights=weights)
    assert "\n" not in str(error.value)


def test_dual_encoder_training_loss_is_the_matryoshka_sum():
    torch.manual_seed(0)
    model = DualEncoder(model="test-vit-micro", matryoshka_dims=[16, 8], loss="siglip")
    images = torch.randn(4, 3, 32, 32)
    text = model.tokenizer(["a one", "a two", "a three", "a four"])
    image_emb, text_emb = model.encode_image(images), model.encode_text(text)
    got = model._loss(image_emb, text_emb, torch.arange(4))
    scale, bias = model.model.logit_scale.exp(), model.model.logit_bias
    want = sum(
        SigLIPLoss()(truncate_embeddings(image_emb, d), truncate_embeddings(text_emb, d), scale, bias)
        for d in (32, 16, 8)
    )
    torch.testing.assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, 8])
def test_tiny_fit_logs_validation_metrics_at_every_trained_dim(tmp_path, digits_root, chunk):
    run_dir = tmp_path / "run"
    code = main(
        fit_argv(
            module=DUAL_ENCODER,
            train=digits_root / "train",
            val=digits_root / "val",
            samples_per_epoch=32,
            max_epochs=1,
            run_dir=run_dir,
            model_args={
                "matryoshka_dims": "[16, 8]",
                "warmup_steps": 1,
                "gradcache_chunk_size": chunk,
            },
        )
    )
    assert code == 0
    rows = []
    for path in run_dir.rglob("metrics.csv"):
        with path.open() as handle:
            rows += list(csv.DictReader(handle))
    logged = {key for row in rows for key, value in row.items() if value not in ("", None)}
    for key in (
        "val/image_retrieval_recall@1",
        "val/dim16/image_retrieval_recall@1",
        "val/dim8/image_retrieval_recall@1",
        "val/dim8/text_retrieval_recall@5",
        "val/dim8/acc1",
        "train/loss",
    ):
        assert key in logged, sorted(logged)
    assert not any(key.startswith("val/dim32/") for key in logged)


def test_gradcache_step_equals_plain_step_with_matryoshka():
    from tests.test_dual_encoder import GradientRecorder, fit_steps, fixed_batch

    batches, recorded = None, []
    for chunk in (None, 3):
        torch.manual_seed(0)
        model = DualEncoder(
            model="test-vit-micro",
            gradcache_chunk_size=chunk,
            warmup_steps=1,
            lr=1e-3,
            matryoshka_dims=[16, 4],
        )
        batches = batches or [fixed_batch(model, batch_size=10, seed=0)]
        recorder = GradientRecorder()
        fit_steps(model, batches, callbacks=[recorder], precision="64-true")  # exact: float64
        recorded.append(recorder.steps)
    (plain,), (cached,) = recorded
    assert plain.keys() == cached.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(
            cached[name], grad, rtol=1e-7, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}"
        )
