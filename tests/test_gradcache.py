"""GradCache gives the full-batch gradient: single process, plain DDP, and a LightningModule under DDP.

    .venv/bin/pytest tests/test_gradcache.py                   # single process (default tier)
    .venv/bin/pytest tests/test_gradcache.py -m ddp            # 2 gloo ranks, plain DDP

The LightningModule-under-DDP check is tests/test_gradcache_lightning.py (kept apart so the plain-DDP ranks
don't pay for importing Lightning).

Towers have dropout on purpose: the gradient is exact only if each chunk's re-encoding draws the same masks as
its first encoding. References encode the same chunks in the same order (so they draw the same masks) but
keep the whole graph and call `.backward()` on the full-batch loss. The loss reference is open_clip's
`ClipLoss` / `SigLipLoss` on the concatenated batch of every rank.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from mmret.losses import InfoNCELoss, SigLIPLoss
from mmret.training import gradcache
from mmret.training.gradcache import gradcache_backward
from tests.ddp_helpers import run_ddp

TOL = {"rtol": 1e-5, "atol": 1e-5}
IMAGE_FEATURES, VOCAB, SEQ_LEN, DIM = 12, 40, 5, 8
CHUNK = 4


class TinyTowers(nn.Module):
    """MLP image tower and embedding-bag text tower, both with dropout; forward encodes whichever it is given."""

    def __init__(self, dropout: float = 0.3, with_bias: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)  # same initial weights everywhere
        self.image_tower = nn.Sequential(
            nn.Linear(IMAGE_FEATURES, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, DIM)
        )
        self.token_bag = nn.EmbeddingBag(VOCAB, 16, mode="mean", padding_idx=0)
        self.text_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(16, DIM))
        self.logit_scale = nn.Parameter(torch.tensor(1.5))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0)) if with_bias else None
        self.double()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(images), dim=-1)  # [b, DIM]

    def encode_text(self, texts: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.text_head(self.token_bag(texts["input_ids"])), dim=-1)  # [b, DIM]

    def forward(self, images=None, texts=None):
        return self.encode_image(images) if images is not None else self.encode_text(texts)


def _data(rows: int, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(rows, IMAGE_FEATURES, generator=generator, dtype=torch.float64)
    input_ids = torch.randint(0, VOCAB, (rows, SEQ_LEN), generator=generator)
    input_ids[::3, -2:] = 0  # some padding
    sample_ids = torch.arange(rows) // 2  # pairs of captions of one image
    return images, {"input_ids": input_ids}, sample_ids


def _loss_fn(model: TinyTowers, kind: str, sample_ids: torch.Tensor | None, gather: bool = True):
    if kind == "infonce":
        loss = InfoNCELoss(gather=gather)
        return lambda i, t: loss(i, t, model.logit_scale.exp(), sample_ids=sample_ids)
    loss = SigLIPLoss(gather=gather)
    return lambda i, t: loss(i, t, model.logit_scale.exp(), model.logit_bias, sample_ids=sample_ids)


def _reference_loss(model: TinyTowers, kind: str, image_emb, text_emb):
    from open_clip.loss import ClipLoss, SigLipLoss

    if kind == "infonce":
        return ClipLoss()(image_emb, text_emb, model.logit_scale.exp())
    return SigLipLoss()(image_emb, text_emb, model.logit_scale.exp(), model.logit_bias)


def _encode_chunkwise_with_graph(model: TinyTowers, images, texts, chunk_size: int):
    """The full batch encoded in the same chunk order as GradCache (same RNG draws), graph kept."""
    image_chunks = gradcache.split_batch(images, chunk_size)
    text_chunks = gradcache.split_batch(texts, chunk_size)
    image_parts, text_parts = [], []
    for image_chunk, text_chunk in zip(image_chunks, text_chunks):
        image_parts.append(model.encode_image(image_chunk))
        text_parts.append(model.encode_text(text_chunk))
    return torch.cat(image_parts), torch.cat(text_parts)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


# --- single process ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_gradcache_equals_full_batch_gradient(kind):
    images, texts, _ = _data(rows=10)  # chunks of 4, 4, 2
    model = TinyTowers(with_bias=kind == "siglip")

    torch.manual_seed(7)
    image_emb, text_emb = _encode_chunkwise_with_graph(model, images, texts, CHUNK)
    reference_loss = _reference_loss(model, kind, image_emb, text_emb)
    reference_loss.backward()
    reference = _grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    out = gradcache_backward(
        model.encode_image, model.encode_text, images, texts, _loss_fn(model, kind, None), chunk_size=CHUNK
    )
    assert out.num_chunks == 3
    torch.testing.assert_close(out.loss, reference_loss.detach(), **TOL)
    torch.testing.assert_close(out.image_emb, image_emb.detach(), **TOL)
    ours = _grads(model)
    assert ours.keys() == reference.keys() and "logit_scale" in ours
    for name, grad in reference.items():
        torch.testing.assert_close(ours[name], grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_gradcache_without_dropout_equals_one_full_batch_forward():
    images, texts, sample_ids = _data(rows=12)
    model = TinyTowers(dropout=0.0)
    loss = InfoNCELoss()
    loss(model.encode_image(images), model.encode_text(texts), model.logit_scale.exp(), sample_ids).backward()
    reference = _grads(model)
    model.zero_grad(set_to_none=True)
    gradcache_backward(
        model.encode_image,
        model.encode_text,
        images,
        texts,
        _loss_fn(model, "infonce", sample_ids),
        chunk_size=5,
    )
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, reference[name], **TOL)


def test_gradcache_needs_the_rng_replay(monkeypatch):
    """Control: without restoring the RNG per chunk the dropout masks differ and the gradient is wrong."""
    images, texts, _ = _data(rows=8)
    model = TinyTowers()
    torch.manual_seed(7)
    gradcache_backward(
        model.encode_image, model.encode_text, images, texts, _loss_fn(model, "infonce", None), CHUNK
    )
    replayed = _grads(model)["image_tower.0.weight"]
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(gradcache._RandomState, "restore", lambda self: None)
    torch.manual_seed(7)
    gradcache_backward(
        model.encode_image, model.encode_text, images, texts, _loss_fn(model, "infonce", None), CHUNK
    )
    assert not torch.allclose(_grads(model)["image_tower.0.weight"], replayed, **TOL)


def test_gradcache_no_sync_wraps_every_chunk_but_the_last():
    images, texts, _ = _data(rows=10)
    model = TinyTowers()
    events: list[str] = []

    @contextlib.contextmanager
    def no_sync():
        events.append("enter")
        yield
        events.append("exit")

    def backward(surrogate: torch.Tensor) -> None:
        # The loss parameter's gradient must arrive in the last (synchronised) backward, not before.
        events.append(
            "backward+scale"
            if model.logit_scale.grad is None and _uses_logit_scale(surrogate)
            else "backward"
        )
        surrogate.backward()

    gradcache_backward(
        model.encode_image,
        model.encode_text,
        images,
        texts,
        _loss_fn(model, "infonce", None),
        CHUNK,
        no_sync,
        backward,
    )
    assert events == ["enter", "backward", "exit", "enter", "backward", "exit", "backward+scale"]


def _uses_logit_scale(surrogate: torch.Tensor) -> bool:
    leaves = gradcache._loss_parameters(surrogate, exclude=[])
    return any(leaf.dim() == 0 for leaf in leaves)


def test_gradcache_rejects_bad_arguments():
    images, texts, _ = _data(rows=6)
    model = TinyTowers()
    with pytest.raises(ValueError, match="chunk_size"):
        gradcache_backward(model.encode_image, model.encode_text, images, texts, lambda i, t: i.sum(), 0)
    with pytest.raises(ValueError, match="differ"):
        gradcache_backward(model.encode_image, model.encode_text, images[:5], texts, lambda i, t: i.sum(), 2)
    with pytest.raises(ValueError, match="both the image and the text"):
        gradcache_backward(model.encode_image, model.encode_text, images, texts, lambda i, t: i.sum(), 2)


# --- plain DDP, 2 gloo ranks --------------------------------------------------------------------------------

PER_RANK = 10
_ALLREDUCE_CALLS = [0]


def _counting_allreduce_hook(process_group, bucket):
    """DDP's default all-reduce, counted, to check that a GradCache step all-reduces exactly once."""
    _ALLREDUCE_CALLS[0] += 1
    return default_hooks.allreduce_hook(process_group, bucket)


def _rank_batch(images, texts, rank: int, per_rank: int):
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return images[rows], {key: value[rows] for key, value in texts.items()}


def _plain_ddp_worker(rank: int, world_size: int, out_dir: Path) -> None:
    images, texts, _ = _data(rows=world_size * PER_RANK)
    model = TinyTowers()
    ddp_model = DistributedDataParallel(model)
    ddp_model.register_comm_hook(None, _counting_allreduce_hook)
    local_images, local_texts = _rank_batch(images, texts, rank, PER_RANK)
    loss = InfoNCELoss()
    for step in range(2):  # the second step checks that no stale DDP state makes extra all-reduces
        model.zero_grad(set_to_none=True)
        torch.manual_seed(100 * step + rank)
        calls_before = _ALLREDUCE_CALLS[0]
        gradcache_backward(
            lambda x: ddp_model(images=x),  # through DDP's forward, as a plain training loop would
            lambda t: ddp_model(texts=t),
            local_images,
            local_texts,
            lambda i, t: loss(i, t, model.logit_scale.exp()),
            chunk_size=CHUNK,
            no_sync=ddp_model.no_sync,
        )
        assert _ALLREDUCE_CALLS[0] - calls_before == 1, "GradCache should all-reduce once per step"
    torch.save(_grads(model), out_dir / f"grads{rank}.pt")


@pytest.mark.ddp
def test_gradcache_plain_ddp_two_ranks_equals_full_batch(tmp_path):
    world_size = 2
    run_ddp(_plain_ddp_worker, world_size=world_size, args=(tmp_path,))
    # Reference (here, so the ranks don't import open_clip): one process, every rank's chunks replayed with
    # that rank's seed of the last step, one backward of the full-batch loss.
    images, texts, _ = _data(rows=world_size * PER_RANK)
    reference_model = TinyTowers()
    image_parts, text_parts = [], []
    for rank in range(world_size):
        torch.manual_seed(100 * 1 + rank)
        image_emb, text_emb = _encode_chunkwise_with_graph(
            reference_model, *_rank_batch(images, texts, rank, PER_RANK), CHUNK
        )
        image_parts.append(image_emb)
        text_parts.append(text_emb)
    _reference_loss(reference_model, "infonce", torch.cat(image_parts), torch.cat(text_parts)).backward()
    for rank in range(world_size):
        ddp_grads = torch.load(tmp_path / f"grads{rank}.pt")
        for name, grad in _grads(reference_model).items():
            torch.testing.assert_close(
                ddp_grads[name], grad, **TOL, msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}"
            )


# --- CUDA: the generator state of the GPU is replayed too ---------------------------------------------------


@pytest.mark.gpu
def test_gradcache_on_cuda_replays_dropout_masks(monkeypatch):
    device = torch.device("cuda")
    images, texts, sample_ids = _data(rows=10)
    images, texts, sample_ids = (
        images.to(device),
        {"input_ids": texts["input_ids"].to(device)},
        sample_ids.to(device),
    )
    model = TinyTowers().to(device)

    torch.manual_seed(7)  # seeds the CPU and every CUDA generator
    image_emb, text_emb = _encode_chunkwise_with_graph(model, images, texts, CHUNK)
    InfoNCELoss()(image_emb, text_emb, model.logit_scale.exp(), sample_ids).backward()
    reference = _grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    loss_fn = _loss_fn(model, "infonce", sample_ids)
    gradcache_backward(model.encode_image, model.encode_text, images, texts, loss_fn, chunk_size=CHUNK)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, reference[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")

    # Control: restoring only the CPU generator is not enough on the GPU.
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *args, **kwargs: None)
    torch.manual_seed(7)
    gradcache_backward(model.encode_image, model.encode_text, images, texts, loss_fn, chunk_size=CHUNK)
    assert not torch.allclose(_grads(model)["image_tower.0.weight"], reference["image_tower.0.weight"], **TOL)
