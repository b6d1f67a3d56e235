"""Two real gloo ranks on CPU: collectives, parity with open_clip's distributed losses, and DDP gradients.

    .venv/bin/pytest tests/test_losses_ddp.py -m ddp

Each test spawns one 2-rank group and runs several checks in it: spawning (importing open_clip in each
process) costs far more than the checks on a 2-core machine, so the loss checks share one group. Data are
float64 and built from one seed on every rank, so each rank also computes the single-process reference on
the full batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmret import distributed
from mmret.losses import InfoNCELoss, SigLIPLoss
from tests.ddp_helpers import run_ddp

pytestmark = [pytest.mark.ddp]

TOL = {"rtol": 1e-6, "atol": 1e-6}
BATCH, DIM = 4, 6  # per rank


def _global_data(world_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    n = world_size * BATCH
    image = F.normalize(torch.randn(n, DIM, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, DIM, generator=generator, dtype=torch.float64), dim=-1)
    ids = torch.tensor([0, 1, 2, 0, 3, 2, 4, 0])[:n]  # duplicates within and across ranks
    return image, text, ids


def _local(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tensor[rank * BATCH : (rank + 1) * BATCH]


def _loss_and_grads(loss_fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = loss_fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


# --- collectives --------------------------------------------------------------------------------------------


def _collectives_worker(rank: int, world_size: int) -> None:
    assert distributed.is_distributed()
    assert (distributed.get_rank(), distributed.get_world_size()) == (rank, world_size)

    # all_gather_with_grad: rank s's loss is sum(weights_s * gathered), so rank r's rows must receive the sum
    # over s of weights_s[rows of r] — not only its own rank's weights.
    local = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    gathered = distributed.all_gather_with_grad(local)  # [4, 3]
    assert torch.equal(gathered[:, 0], torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=torch.float64))
    weights = [torch.arange(12, dtype=torch.float64).reshape(4, 3) * (s + 1) for s in range(world_size)]
    (gathered * weights[rank]).sum().backward()
    expected = sum(w[rank * 2 : (rank + 1) * 2] for w in weights)
    torch.testing.assert_close(local.grad, expected)

    # all_gather_no_grad: other ranks' rows are constants; the local slice keeps its gradient if asked.
    local = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    gathered = distributed.all_gather_no_grad(local)
    gathered.sum().backward()
    assert torch.equal(local.grad, torch.ones(2, 3, dtype=torch.float64))
    assert not distributed.all_gather_no_grad(local, keep_local_grad=False).requires_grad

    # all_gather_variable: rank 0 holds 3 rows, rank 1 holds 5; order and lengths are kept, grads exact.
    rows = 3 if rank == 0 else 5
    values = torch.arange(rows, dtype=torch.float64)[:, None] + 10 * rank
    gathered = distributed.all_gather_variable(values)
    assert torch.equal(gathered[:, 0], torch.tensor([0, 1, 2, 10, 11, 12, 13, 14], dtype=torch.float64))
    ids = distributed.all_gather_variable(torch.arange(rows) + 100 * rank)
    assert ids.tolist() == [0, 1, 2, 100, 101, 102, 103, 104]
    leaf = values.clone().requires_grad_()
    (distributed.all_gather_variable(leaf) * (rank + 1)).sum().backward()
    assert torch.equal(leaf.grad, torch.full_like(leaf, 3.0))  # 1 + 2, summed over both ranks' losses

    total = distributed.all_reduce_sum(torch.tensor([rank + 1.0]))
    assert total.item() == 3.0

    # neighbour_exchange: a ring shift whose gradient returns to the sender.
    block = torch.full((2,), float(rank), dtype=torch.float64, requires_grad=True)
    right, left = (rank + 1) % world_size, (rank - 1) % world_size
    received = distributed.neighbour_exchange(block, send_to=right, recv_from=left)
    assert torch.equal(received, torch.full((2,), float(left), dtype=torch.float64))
    (received * (rank + 5)).sum().backward()
    assert torch.equal(block.grad, torch.full((2,), float(right + 5), dtype=torch.float64))


def test_collectives_two_ranks():
    run_ddp(_collectives_worker, world_size=2)


# --- parity with open_clip's distributed losses ------------------------------------------------------------


def _assert_parity(ours, reference, inputs, what: str) -> None:
    loss, grads = _loss_and_grads(ours, *inputs)
    ref_loss, ref_grads = _loss_and_grads(reference, *inputs)
    torch.testing.assert_close(loss, ref_loss, **TOL, msg=lambda m: f"{what} loss: {m}")
    for index, (grad, ref_grad) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(grad, ref_grad, **TOL, msg=lambda m, i=index: f"{what} grad {i}: {m}")


def _check_parity_with_open_clip(rank: int, world_size: int) -> None:
    from open_clip.loss import ClipLoss, SigLipLoss  # imported here: the collectives test doesn't need it

    image, text, _ = _global_data(world_size)
    image, text = _local(image, rank), _local(text, rank)
    scale = torch.tensor(12.0, dtype=torch.float64)
    bias = torch.tensor(-6.0, dtype=torch.float64)
    for local_loss in (True, False):
        for gather_with_grad in (True, False):
            _assert_parity(
                InfoNCELoss(local_loss=local_loss, gather_with_grad=gather_with_grad),
                ClipLoss(
                    local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size
                ),
                (image, text, scale),
                f"InfoNCE local_loss={local_loss} gather_with_grad={gather_with_grad} rank {rank}",
            )
    for ours_impl, their_impl in (
        ("gather", "bidir"),
        ("gather", "gather"),
        ("ring", "shift"),
        ("ring", "bidir"),
    ):
        _assert_parity(
            SigLIPLoss(dist_impl=ours_impl),
            SigLipLoss(rank=rank, world_size=world_size, dist_impl=their_impl),
            (image, text, scale, bias),
            f"SigLIP ours={ours_impl} open_clip={their_impl} rank {rank}",
        )


# --- DDP gradients equal the single-process gradient on the concatenated batch ------------------------------


class _LinearTowers(nn.Module):
    """Two linear towers plus the loss parameters; forward returns everything the loss needs (one DDP call)."""

    def __init__(self, with_bias: bool) -> None:
        super().__init__()
        torch.manual_seed(0)  # identical initial weights on every rank and in the reference
        self.image_tower = nn.Linear(7, DIM).double()
        self.text_tower = nn.Linear(5, DIM).double()
        self.logit_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))  # log of the scale
        self.logit_bias = nn.Parameter(torch.tensor(-3.0, dtype=torch.float64)) if with_bias else None

    def forward(self, images, texts):
        image_emb = F.normalize(self.image_tower(images), dim=-1)
        text_emb = F.normalize(self.text_tower(texts), dim=-1)
        extra = () if self.logit_bias is None else (self.logit_bias,)
        return image_emb, text_emb, self.logit_scale.exp(), *extra


def _gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _check_ddp_gradients(rank: int, world_size: int) -> None:
    from open_clip.loss import ClipLoss, SigLipLoss

    generator = torch.Generator().manual_seed(1)
    images = torch.randn(world_size * BATCH, 7, generator=generator, dtype=torch.float64)
    texts = torch.randn(world_size * BATCH, 5, generator=generator, dtype=torch.float64)
    _, _, ids = _global_data(world_size)
    # (name, our loss, single-process reference on the full batch, sample ids, expected DDP/reference ratio
    # of the tower gradients; the loss parameters' gradient is always exact)
    cases = [
        ("InfoNCE local", InfoNCELoss(local_loss=True), ClipLoss(), None, 1.0),
        ("InfoNCE full", InfoNCELoss(local_loss=False), ClipLoss(), None, 1.0),
        ("SigLIP gather", SigLIPLoss(dist_impl="gather"), SigLipLoss(), None, 1.0),
        ("SigLIP ring", SigLIPLoss(dist_impl="ring"), SigLipLoss(), None, 1.0),
        # open_clip's no-grad gather with the full matrix: each rank's rows only get their own rows'
        # gradient, so after DDP's averaging the tower gradients are the true ones / world_size (documented);
        # logit_scale's is exact because every rank computes the whole loss.
        (
            "InfoNCE full no-grad gather",
            InfoNCELoss(local_loss=False, gather_with_grad=False),
            ClipLoss(),
            None,
            0.5,
        ),
        ("InfoNCE local ids", InfoNCELoss(local_loss=True), InfoNCELoss(gather=False), ids, 1.0),
        ("InfoNCE full ids", InfoNCELoss(local_loss=False), InfoNCELoss(gather=False), ids, 1.0),
        ("SigLIP gather ids", SigLIPLoss(dist_impl="gather"), SigLIPLoss(gather=False), ids, 1.0),
        ("SigLIP ring ids", SigLIPLoss(dist_impl="ring"), SigLIPLoss(gather=False), ids, 1.0),
    ]
    for name, ours, reference, sample_ids, tower_ratio in cases:
        with_bias = "SigLIP" in name
        model = DistributedDataParallel(_LinearTowers(with_bias))
        (*outputs,) = model(_local(images, rank), _local(texts, rank))
        id_args = {} if sample_ids is None else {"sample_ids": _local(sample_ids, rank)}
        loss = ours(*outputs, **id_args)
        loss.backward()
        ddp_grads = _gradients(model.module)

        single = _LinearTowers(with_bias)
        # Reference: one process, concatenated batch, no gathering (open_clip with world_size=1, or ours
        # with gather=False for the sample-id cases, whose single-process masking test_losses.py checks).
        ref_args = {} if sample_ids is None else {"sample_ids": sample_ids}
        ref_loss = reference(*single(images, texts), **ref_args)
        ref_loss.backward()
        # The per-rank losses average to the single-process loss.
        torch.testing.assert_close(distributed.all_reduce_sum(loss) / world_size, ref_loss.detach(), **TOL)
        for param_name, grad in _gradients(single).items():
            ratio = tower_ratio if "tower" in param_name else 1.0
            torch.testing.assert_close(
                ddp_grads[param_name],
                ratio * grad,
                **TOL,
                msg=lambda m, n=param_name, c=name: f"{c} {n}: {m}",
            )


def _losses_worker(rank: int, world_size: int) -> None:
    _check_parity_with_open_clip(rank, world_size)
    _check_ddp_gradients(rank, world_size)


def test_losses_two_ranks_match_open_clip_and_single_process_gradients():
    """Forward/grad parity with open_clip's ClipLoss/SigLipLoss per rank, then DDP gradient = 1-process gradient."""
    run_ddp(_losses_worker, world_size=2)
