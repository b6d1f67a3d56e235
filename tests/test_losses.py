"""Single-process checks of mmret.losses: parity with open_clip, sample-id masking, reranker losses.

    .venv/bin/pytest tests/test_losses.py

References are open_clip's own losses (`ClipLoss`, `SigLipLoss`), torch's `cross_entropy` /
`binary_cross_entropy_with_logits`, and sums written out pair by pair. The 2-rank versions live in
tests/test_losses_ddp.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from mmret.losses import (
    InfoNCELoss,
    ListwiseLoss,
    SigLIPLoss,
    binary_cross_entropy_loss,
    listwise_infonce_loss,
)

TOL = {"rtol": 1e-6, "atol": 1e-6}


def _embeddings(batch: int = 6, dim: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    return image, text


def _loss_and_grads(loss_fn, *inputs):
    """Loss value and its gradient w.r.t. every input (fresh leaves, so references and ours don't interfere)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = loss_fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("local_loss", [True, False])
@pytest.mark.parametrize("gather_with_grad", [True, False])
def test_infonce_matches_open_clip_cliploss(local_loss, gather_with_grad):
    image, text = _embeddings()
    scale = torch.tensor(14.0, dtype=torch.float64)
    ours = InfoNCELoss(local_loss=local_loss, gather_with_grad=gather_with_grad)
    reference = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)
    loss, grads = _loss_and_grads(ours, image, text, scale)
    ref_loss, ref_grads = _loss_and_grads(reference, image, text, scale)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **TOL)


def test_siglip_matches_open_clip_sigliploss():
    image, text = _embeddings()
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    loss, grads = _loss_and_grads(SigLIPLoss(), image, text, scale, bias)
    ref_loss, ref_grads = _loss_and_grads(SigLipLoss(), image, text, scale, bias)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for grad, ref_grad in zip(grads, ref_grads):  # image, text, logit_scale, logit_bias
        torch.testing.assert_close(grad, ref_grad, **TOL)


def _hand_masked_infonce(image, text, scale, ids):
    """CE both ways after setting same-id, non-positive logits to -inf by hand, entry by entry."""
    logits = scale * image @ text.T
    masked = logits.clone()
    for i in range(len(ids)):
        for j in range(len(ids)):
            if i != j and ids[i] == ids[j]:
                masked[i, j] = float("-inf")
    labels = torch.arange(len(ids))
    return (F.cross_entropy(masked, labels) + F.cross_entropy(masked.T, labels)) / 2


def test_infonce_sample_ids_mask_same_id_pairs_as_by_hand():
    image, text = _embeddings(batch=6)
    scale = torch.tensor(5.0, dtype=torch.float64)
    ids = torch.tensor([0, 1, 0, 2, 1, 0])  # three captions of image 0, two of image 1
    loss, grads = _loss_and_grads(lambda i, t, s: InfoNCELoss()(i, t, s, sample_ids=ids), image, text, scale)
    ref_loss, ref_grads = _loss_and_grads(
        lambda i, t, s: _hand_masked_infonce(i, t, s, ids), image, text, scale
    )
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **TOL)
    # The mask matters (duplicates change the loss), and distinct ids are the same as no ids.
    unmasked = InfoNCELoss()(image, text, scale)
    assert not torch.isclose(loss, unmasked)
    torch.testing.assert_close(InfoNCELoss()(image, text, scale, sample_ids=torch.arange(6)), unmasked, **TOL)


def test_siglip_sample_ids_drop_same_id_pairs_from_the_sum():
    image, text = _embeddings(batch=5)
    scale, bias = torch.tensor(8.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    ids = torch.tensor([3, 7, 3, 3, 9])
    loss = SigLIPLoss()(image, text, scale, bias, sample_ids=ids)
    expected = torch.zeros((), dtype=torch.float64)
    for i in range(5):
        for j in range(5):
            if i != j and ids[i] == ids[j]:
                continue  # neither positive nor negative
            label = 1.0 if i == j else -1.0
            expected = expected - F.logsigmoid(label * (scale * image[i] @ text[j] + bias))
    torch.testing.assert_close(loss, expected / 5, **TOL)
    assert not torch.isclose(loss, SigLIPLoss()(image, text, scale, bias))


def test_losses_run_in_float32_under_low_precision_inputs():
    image, text = _embeddings()
    scale = torch.tensor(20.0)
    low = InfoNCELoss()(image.bfloat16(), text.bfloat16(), scale.bfloat16())
    assert low.dtype == torch.float32
    full = InfoNCELoss()(image.bfloat16().float(), text.bfloat16().float(), scale)
    torch.testing.assert_close(low, full)


def test_siglip_rejects_unknown_dist_impl():
    with pytest.raises(ValueError, match="dist_impl"):
        SigLIPLoss(dist_impl="allreduce")


# --- reranker losses ------------------------------------------------------------------------------------


def _scores(queries: int = 4, candidates: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(
        queries, candidates, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


@pytest.mark.parametrize("aggregation", ["mean", "logsumexp"])
def test_listwise_one_positive_equals_cross_entropy(aggregation):
    scores = _scores()
    loss = listwise_infonce_loss(
        scores, temperature=0.5, positive_aggregation=aggregation
    )  # column 0 positive
    torch.testing.assert_close(loss, F.cross_entropy(scores / 0.5, torch.zeros(4, dtype=torch.long)), **TOL)
    positives = torch.zeros(4, 6, dtype=torch.bool)
    positives[torch.arange(4), torch.tensor([2, 0, 5, 1])] = True
    loss = listwise_infonce_loss(scores, positives, positive_aggregation=aggregation)
    torch.testing.assert_close(loss, F.cross_entropy(scores, torch.tensor([2, 0, 5, 1])), **TOL)


def test_listwise_multi_positive_by_hand():
    scores = _scores(queries=3, candidates=5)
    positives = torch.tensor(
        [[1, 1, 0, 0, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool
    )  # last query: no positive, left out of the mean
    per_query_mean, per_query_lse = [], []
    for q in range(2):
        pos = [c for c in range(5) if positives[q, c]]
        neg = [c for c in range(5) if not positives[q, c]]
        s = scores[q].tolist()
        negative_mass = sum(math.exp(s[c]) for c in neg)
        per_query_mean.append(
            sum(-math.log(math.exp(s[p]) / (math.exp(s[p]) + negative_mass)) for p in pos) / len(pos)
        )
        per_query_lse.append(-math.log(sum(math.exp(s[p]) for p in pos) / sum(math.exp(x) for x in s)))
    mean_loss = listwise_infonce_loss(scores, positives, positive_aggregation="mean")
    lse_loss = listwise_infonce_loss(scores, positives, positive_aggregation="logsumexp")
    assert mean_loss.item() == pytest.approx(sum(per_query_mean) / 2, rel=1e-9)
    assert lse_loss.item() == pytest.approx(sum(per_query_lse) / 2, rel=1e-9)
    per_query = listwise_infonce_loss(scores, positives, reduction="none")
    assert per_query.shape == (3,) and per_query[2].item() == 0.0


def test_listwise_mean_pushes_every_positive_up():
    # One easy positive (5) and one hard positive (-3) against two negatives: the log-sum-exp form is
    # already satisfied by the easy one and leaves the hard one nearly alone; the mean form does not.
    scores = torch.tensor([[5.0, -3.0, 0.0, 0.0]], requires_grad=True)
    positives = torch.tensor([[True, True, False, False]])
    (mean_grad,) = torch.autograd.grad(
        listwise_infonce_loss(scores, positives, positive_aggregation="mean"), scores
    )
    (lse_grad,) = torch.autograd.grad(
        listwise_infonce_loss(scores, positives, positive_aggregation="logsumexp"), scores
    )
    assert mean_grad[0, 1] < -0.4  # d loss / d hard positive: strongly negative (raise it)
    assert abs(lse_grad[0, 1]) < 1e-3


def test_listwise_padding_equals_dropping_the_padded_columns():
    scores = _scores(queries=2, candidates=5)
    positives = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    padded = ListwiseLoss(temperature=0.1)(scores, positives, valid)
    first = listwise_infonce_loss(scores[:1, :4], positives[:1, :4], temperature=0.1)
    second = listwise_infonce_loss(scores[1:], positives[1:], temperature=0.1)
    torch.testing.assert_close(padded, (first + second) / 2, **TOL)


def test_listwise_gradient_finite_when_a_query_has_only_positives():
    scores = torch.randn(2, 3, requires_grad=True)
    positives = torch.tensor([[True, True, True], [True, False, False]])
    loss = listwise_infonce_loss(scores, positives)
    loss.backward()
    assert torch.isfinite(scores.grad).all()
    assert torch.equal(scores.grad[0], torch.zeros(3))  # nothing to separate from: zero loss, zero gradient


def test_binary_cross_entropy_matches_torch_over_valid_candidates():
    scores = _scores(queries=3, candidates=4)
    positives = torch.rand(3, 4, generator=torch.Generator().manual_seed(2)) > 0.6
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[0, 3] = valid[2, 2] = False
    expected = F.binary_cross_entropy_with_logits(scores[valid], positives[valid].double())
    torch.testing.assert_close(binary_cross_entropy_loss(scores, positives, valid), expected, **TOL)
    weighted = F.binary_cross_entropy_with_logits(
        scores, positives.double(), pos_weight=torch.tensor(3.0).double()
    )
    torch.testing.assert_close(binary_cross_entropy_loss(scores, positives, pos_weight=3.0), weighted, **TOL)


def test_listwise_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positive_aggregation"):
        ListwiseLoss(positive_aggregation="max")
    with pytest.raises(ValueError, match="temperature"):
        ListwiseLoss(temperature=0.0)
    with pytest.raises(ValueError, match="does not match"):
        listwise_infonce_loss(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool))
