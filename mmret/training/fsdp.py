"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for an open_clip dual encoder, with GradCache under it.

Units: every residual block of each tower (image tower first, then text tower), then the root, which takes
what is left (patch / token embeddings, final norms, projections, logit_scale, logit_bias). Parameters are
sharded over the ranks of `mesh` (default: every rank of the default group); gradients are reduce-scattered
as averages, like DDP's all-reduce, so a per-rank mean loss over gathered negatives reproduces the single-process
full-batch gradient.

    model = create_model("test-vit-micro")
    shard_dual_encoder(model)                       # in place; returns the model
    optimizer = torch.optim.AdamW(model.parameters())  # after sharding: the parameters are DTensor shards
    image_emb, text_emb, logit_scale = model(image=images, text=texts)   # through the ROOT forward
    loss_fn(image_emb, text_emb, logit_scale).backward()
    average_replicated_gradients(model)             # logit_scale stays replicated (see below)
    optimizer.step()

Two rules follow from the root being a unit:

* encode through the root module's forward (`model(image=x)`), not `model.encode_image(x)`: the root's
  pre-forward hook is what all-gathers the root's parameters (patch embedding, projections...) and sets up
  the end-of-backward reshard; `fsdp_encoders(model)` returns such encoders.
* logit_scale / logit_bias are 0-dim, which FSDP2 cannot shard: they are left replicated and their gradients
  must be averaged by `average_replicated_gradients(model)` after the backward, before the optimizer step.
* GradCache: pass `gradcache_no_sync(model)` as `no_sync`, so chunks but the last accumulate unsharded
  gradients without a reduce-scatter and the last chunk reduce-scatters once per step (with the default
  `no_sync=None` every chunk reduce-scatters: also exact, more communication).

Lightning (`ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`): shard in the
LightningModule's `configure_model` with `mesh=self.device_mesh["data_parallel"]`, encode with
`fsdp_encoders(self.model)`, and call `average_replicated_gradients(self.model)` in `on_after_backward` (exact
even once per GradCache chunk: averaging is linear). `lightning_no_sync` finds the FSDP2 root by itself.
tests/test_fsdp2.py does this in a DualEncoder subclass; DualEncoder itself does not yet.

Run the tests: `.venv/bin/pytest tests/test_fsdp2.py -m ddp` (2 gloo ranks on CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mmret import distributed

_BLOCK_LISTS = ("resblocks", "blocks", "layers", "layer")


def _text_tower(model: nn.Module) -> nn.Module | None:
    text = getattr(model, "text", None)
    if text is not None:
        return text
    return getattr(model, "transformer", None)


def residual_blocks(tower: nn.Module) -> list[nn.Module]:
    """The residual blocks of one tower: the entries of its first ModuleList named resblocks / blocks / layers."""
    for name, module in tower.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LISTS:
            return list(module)
    return []


def shard_dual_encoder(
    model: nn.Module,
    mesh=None,
    mixed_precision=None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Wrap `model` (an open_clip CLIP / CustomTextCLIP) with FSDP2 in place: each tower block, then the root.

    Args:
        model: the dual encoder's network (`DualEncoder.model`), on its training device.
        mesh: a 1-D `DeviceMesh` to shard over; None: every rank of the default process group.
        mixed_precision: a `torch.distributed.fsdp.MixedPrecisionPolicy` (see
            `mmret.distributed.mixed_precision_policy`), or None for full precision.
        reshard_after_forward: free the gathered block parameters after each block's forward (ZeRO-3);
            False keeps them until the backward (ZeRO-2-like, more memory, fewer all-gathers). The root is
            never resharded after forward (FSDP2's own rule for the root).

    Returns:
        `model`, now an `FSDPModule`.
    """
    options: dict = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        options["mesh"] = mesh
    if mixed_precision is not None:
        options["mp_policy"] = mixed_precision
    towers = [model.visual, _text_tower(model)]
    for tower in towers:
        if tower is None:
            continue
        for block in residual_blocks(tower):
            distributed.fully_shard(block, **options)
    # FSDP2 cannot shard 0-dim parameters (logit_scale, logit_bias): they stay replicated, outside FSDP, and
    # `average_replicated_gradients` averages their gradients over ranks after the backward (what DDP does).
    distributed.fully_shard(model, ignored_params=set(replicated_parameters(model)), **options)
    return model


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The scalar parameters (logit_scale, logit_bias) that `shard_dual_encoder` leaves replicated."""
    return [param for param in model.parameters() if param.dim() == 0]


def average_replicated_gradients(model: nn.Module) -> None:
    """Average the replicated (scalar) parameters' gradients over ranks; call after the backward of a step
    (after `gradcache_backward`, once), before the optimizer step."""
    world_size = distributed.get_world_size()
    for param in replicated_parameters(model):
        if param.grad is not None and world_size > 1:
            param.grad.copy_(distributed.all_reduce_sum(param.grad) / world_size)


def fsdp_encoders(model: nn.Module) -> tuple[Callable, Callable]:
    """(encode_image, encode_text) that run through the sharded root's forward; L2-normalised `[B, D]`."""

    def encode_image(images: torch.Tensor) -> torch.Tensor:
        return model(image=images)[0]

    def encode_text(text) -> torch.Tensor:
        return model(text=text)[1]

    return encode_image, encode_text


def gradcache_no_sync(model: nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """GradCache's `no_sync` for an FSDP2 model: no reduce-scatter inside it (gradients stay unsharded and
    accumulate), and the next backward outside it reduce-scatters everything accumulated."""

    @contextlib.contextmanager
    def no_sync() -> Iterator[None]:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return no_sync
