"""In-batch false negatives by caption: `CaptionKeys` in InfoNCE and SigLIP, one process and two gloo ranks.

    .venv/bin/pytest tests/test_caption_keys.py            # single process
    .venv/bin/pytest tests/test_caption_keys.py -m ddp     # 2 gloo ranks

Two rows whose images share a caption (two images of one composition) are not each other's negatives: the
loss must equal the same cross-entropy / sigmoid sum written out here with those pairs removed, and must reduce
to the sample-id masking when every image has one caption keyed by its id.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmret import distributed
from mmret.losses import CaptionKeys, HardNegatives, InfoNCELoss, SigLIPLoss
from tests.ddp_helpers import run_ddp

TOL = {"rtol": 1e-6, "atol": 1e-6}
B, D = 6, 8


def _unit(*shape, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def _keys() -> CaptionKeys:
    # Row 1's caption (key 11) is also a caption of row 4's image; row 2's image carries row 5's caption (15).
    text = torch.tensor([10, 11, 12, 13, 14, 15])
    image = torch.tensor([[10, -1, -1], [11, 21, -1], [12, 15, 22], [13, -1, -1], [14, 11, -1], [15, -1, -1]])
    return CaptionKeys(text, image)


def test_infonce_leaves_out_pairs_a_shared_caption_makes_positive():
    image, text = _unit(B, D, seed=0), _unit(B, D, seed=1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    loss = InfoNCELoss()(image, text, scale, caption_keys=_keys())
    logits_i = scale * image @ text.T  # image rows x text columns
    logits_t = logits_i.T.clone()  # text rows x image columns
    logits_i = logits_i.clone()
    # image 4 carries caption 11 (row 1's text); image 2 carries caption 15 (row 5's text)
    logits_i[4, 1] = logits_i[2, 5] = float("-inf")
    logits_t[1, 4] = logits_t[5, 2] = float("-inf")
    labels = torch.arange(B)
    expected = (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2
    torch.testing.assert_close(loss, expected, **TOL)
    assert not torch.allclose(loss, InfoNCELoss()(image, text, scale))


def test_one_caption_per_image_keyed_by_id_equals_sample_id_masking():
    image, text = _unit(B, D, seed=2), _unit(B, D, seed=3)
    scale = torch.tensor(7.0, dtype=torch.float64)
    ids = torch.tensor([0, 1, 1, 2, 3, 3])
    keys = CaptionKeys(ids + 100, (ids + 100)[:, None])
    for loss_fn in (InfoNCELoss(local_loss=False), InfoNCELoss()):
        torch.testing.assert_close(
            loss_fn(image, text, scale, caption_keys=keys), loss_fn(image, text, scale, sample_ids=ids), **TOL
        )
    bias = torch.tensor(-1.5, dtype=torch.float64)
    torch.testing.assert_close(
        SigLIPLoss()(image, text, scale, bias, caption_keys=keys),
        SigLIPLoss()(image, text, scale, bias, sample_ids=ids),
        **TOL,
    )


def test_siglip_drops_pairs_a_shared_caption_makes_positive():
    image, text = _unit(B, D, seed=4), _unit(B, D, seed=5)
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    loss = SigLIPLoss()(image, text, scale, bias, caption_keys=_keys())
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(B, dtype=torch.float64) - 1
    terms = -F.logsigmoid(labels * logits)
    terms[4, 1] = terms[2, 5] = 0.0
    torch.testing.assert_close(loss, terms.sum() / B, **TOL)


def test_caption_keys_check_their_shapes():
    with pytest.raises(ValueError, match="CaptionKeys"):
        CaptionKeys(torch.zeros(3, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long))


# --- two gloo ranks -----------------------------------------------------------------------------------------


def _grad(loss_fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = loss_fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves, allow_unused=True)


def _ddp_worker(rank: int, world_size: int) -> None:
    n = world_size * B
    image, text = _unit(n, D, seed=6), _unit(n, D, seed=7)
    text_neg = _unit(n, 2, D, seed=8)
    text_keys = torch.arange(n) + 100
    # Rank 0's rows carry 2 caption keys, rank 1's 3 (the widths differ across ranks); shared captions cross
    # ranks both ways and stay inside a rank.
    image_keys = torch.full((n, 3), -1)
    image_keys[:, 0] = text_keys
    image_keys[1, 1] = text_keys[B + 3]  # rank 0's image 1 carries rank 1's caption 3
    image_keys[B + 2, 2] = text_keys[4]  # rank 1's image 2 carries rank 0's caption 4
    image_keys[B + 5, 1] = text_keys[B + 0]
    widths = {0: 2, 1: 3}
    scale, bias = torch.tensor(9.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    local = slice(rank * B, (rank + 1) * B)
    row_keys = torch.full((n, 1), -1)
    row_keys[B + 1, 0] = 100 + n  # a perturbation (key 100 + n) of rank 0's row 0 describes rank 1's image 1
    neg_keys = torch.arange(n * 2).reshape(n, 2) + 100 + n

    kinds = ("infonce", "infonce_full", "siglip", "siglip_ring")
    for kind in kinds:

        def loss_fn(i, t, tn, rows=None, kind=kind):
            rows = rows if rows is not None else local
            width = 3 if rows != local else widths[rank]
            keys = CaptionKeys(text_keys[rows], image_keys[rows, :width])
            if kind.startswith("siglip"):
                impl = "ring" if kind == "siglip_ring" else "gather"
                return SigLIPLoss(dist_impl=impl)(i, t, scale, bias, caption_keys=keys)
            negatives = HardNegatives(text=tn, text_keys=neg_keys[rows], row_text_keys=row_keys[rows])
            return InfoNCELoss(local_loss=kind == "infonce")(
                i, t, scale, negatives=negatives, caption_keys=keys
            )

        get_world_size = distributed.get_world_size
        distributed.get_world_size = lambda: 1
        try:
            ref_loss, ref_grads = _grad(lambda *x: loss_fn(*x, rows=slice(0, n)), image, text, text_neg)
        finally:
            distributed.get_world_size = get_world_size
        loss, grads = _grad(loss_fn, image[local], text[local], text_neg[local])
        total = loss.clone()
        torch.distributed.all_reduce(total)
        torch.testing.assert_close(total / world_size, ref_loss, **TOL)
        for name, g, ref in zip(("image", "text", "text_neg"), grads, ref_grads):
            if kind.startswith("siglip") and name == "text_neg":
                continue  # no hard negatives passed to SigLIP here
            torch.testing.assert_close(
                g, ref[local] * world_size, **TOL, msg=lambda m, n=name, k=kind: f"{k} rank {rank} {n}: {m}"
            )


@pytest.mark.ddp
def test_two_ranks_with_caption_keys_equal_one_process_on_the_concatenated_batch():
    run_ddp(_ddp_worker, world_size=2)
