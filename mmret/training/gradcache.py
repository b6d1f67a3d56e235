"""GradCache: contrastive training with a large batch in the memory of a small one (Gao et al., 2021).

A contrastive loss couples every row of the batch, so it cannot be split into micro-batches the usual way.
GradCache splits the *encoders* instead:

1. embed the whole batch chunk by chunk without a graph;
2. turn the full embeddings into leaf tensors, compute the loss on them (the loss gathers across ranks itself)
   and take d loss / d embeddings and d loss / d (its own parameters: logit_scale, logit_bias), with
   `autograd.grad`, so nothing reaches `.grad` outside step 3;
3. re-encode chunk by chunk WITH a graph and backprop `sum(emb_chunk * cached_grad_chunk)` — one backward
   per chunk through BOTH towers, so every DDP-tracked parameter takes part in every backward;
4. under DDP, all chunks but the last run inside `no_sync`, so gradients are all-reduced once per step; the
   loss parameters' gradients join that last, synchronised backward.

The result is exactly the full-batch gradient: dropout masks match between pass 1 and pass 3 because the
CPU (and CUDA) RNG state is saved before each chunk's first encoding and restored before its re-encoding.
Peak memory is about the larger of one chunk's step and the full-batch loss (`[B, world*B]` logits), plus
the cached `[B, D]` embeddings and their gradients — not the full batch's activations
(experiments/benchmarks/loss_memory.py).

Plain PyTorch DDP — the encoders must run through the DDP wrapper's forward, which is where DDP arms the
gradient all-reduce of the following backward (calling `ddp_model.module.encode_image` would never sync):

    out = gradcache_backward(lambda x: ddp_model(images=x), lambda t: ddp_model(texts=t), images, texts,
                             loss_fn=lambda i, t: loss(i, t, model.logit_scale.exp()),
                             chunk_size=64, no_sync=ddp_model.no_sync)
    optimizer.step()

In a LightningModule (manual optimisation, `self.automatic_optimization = False`):

    out = lightning_gradcache_backward(self, self.encode_image, self.encode_text, images, texts, loss_fn, 64)

Run the tests: `.venv/bin/pytest tests/test_gradcache.py tests/test_gradcache_lightning.py` (2-rank plain DDP
and Lightning `ddp_spawn` runs are marked `ddp`; the CUDA RNG replay test is marked `gpu`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Batch = Tensor | Mapping[str, Tensor]
Encoder = Callable[[Any], Tensor]


@dataclass
class GradCacheOutput:
    """What one GradCache step returns (all detached), for logging.

    Attributes:
        loss: the scalar loss of the full local batch.
        image_emb: `[B, D]` image embeddings of the full local batch (float32 or wider).
        text_emb: `[B, D]` text embeddings.
        num_chunks: number of encoder chunks (= backward passes through the towers).
    """

    loss: Tensor
    image_emb: Tensor
    text_emb: Tensor
    num_chunks: int


def batch_size(batch: Batch) -> int:
    """Rows in a tensor batch or in a dict of tensors (which must all agree)."""
    if isinstance(batch, Tensor):
        return batch.shape[0]
    sizes = {key: value.shape[0] for key, value in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def split_batch(batch: Batch, chunk_size: int) -> list[Batch]:
    """Chunks of at most `chunk_size` rows along dim 0; a dict batch is split key by key."""
    if isinstance(batch, Tensor):
        return list(batch.split(chunk_size))
    keys = list(batch)
    pieces = [batch[key].split(chunk_size) for key in keys]
    return [dict(zip(keys, chunk)) for chunk in zip(*pieces)]


def _cuda_devices(*batches: Batch) -> list[torch.device]:
    tensors = [b for b in batches if isinstance(b, Tensor)] + [
        t for b in batches if isinstance(b, Mapping) for t in b.values()
    ]
    devices = {t.device for t in tensors if t.is_cuda}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.add(torch.device("cuda", torch.cuda.current_device()))
    return sorted(devices, key=str)


class _RandomState:
    """CPU and (used) CUDA generator states, so a chunk's re-encoding draws the same dropout masks."""

    def __init__(self, cuda_devices: list[torch.device]) -> None:
        self.cpu = torch.get_rng_state()
        # Only the devices in use: get_rng_state_all() would create a CUDA context on every GPU of the node.
        self.cuda = {device: torch.cuda.get_rng_state(device) for device in cuda_devices}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)


def _loss_parameters(loss: Tensor, exclude: list[Tensor]) -> list[Tensor]:
    """Leaf tensors requiring grad that `loss` depends on (e.g. logit_scale), other than `exclude`."""
    found: list[Tensor] = []
    seen: set = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # set on AccumulateGrad nodes, i.e. graph leaves
        if variable is not None:
            if not any(variable is leaf for leaf in exclude):
                found.append(variable)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _as_loss_input(embeddings: list[Tensor]) -> Tensor:
    emb = torch.cat(embeddings)  # [B, D]
    # float32 leaves: the cached gradients must not underflow in fp16 (they are scaled only at step 3).
    if emb.dtype in (torch.float16, torch.bfloat16):
        emb = emb.float()
    return emb.detach().requires_grad_()


def gradcache_backward(
    encode_image: Encoder,
    encode_text: Encoder,
    images: Batch,
    texts: Batch,
    loss_fn: Callable[..., Tensor],
    chunk_size: int,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    backward: Callable[[Tensor], None] | None = None,
    extra_inputs: Sequence[tuple[Encoder, Batch]] = (),
) -> GradCacheOutput:
    """Accumulate into `.grad` the exact gradient of `loss_fn` over the full batch, one chunk at a time.

    Call it where you would call `loss.backward()`; gradients are ADDED to `.grad` (zero them first).

    Args:
        encode_image: chunk of `images` -> `[b, D]` embeddings (model forward, normalisation included).
        encode_text: chunk of `texts` -> `[b, D]` embeddings.
        images: `[B, ...]` tensor or dict of `[B, ...]` tensors.
        texts: `[B, ...]` tensor or dict of `[B, ...]` tensors (e.g. token ids and attention mask).
        loss_fn: (image_emb `[B, D]`, text_emb `[B, D]`) -> scalar loss over the full local batch; it does its
            own cross-rank gathering and may use parameters (logit_scale), which receive their gradient here.
        chunk_size: rows per encoder chunk.
        no_sync: zero-argument context-manager factory that suspends DDP's gradient all-reduce
            (`ddp_model.no_sync`; in Lightning `trainer.strategy.block_backward_sync`). Every chunk but the last
            runs inside it; None runs every chunk normally (single process).
        backward: called on each chunk's surrogate scalar; default `Tensor.backward`. Lightning passes
            `module.manual_backward` so the precision plugin's loss scaling and DDP's prepare-for-backward apply.
        extra_inputs: further (encoder, batch) pairs whose `[M, D]` embeddings the loss also reads, e.g. hard
            negatives (mined images, perturbed captions); `loss_fn` then takes them after the two main ones,
            in this order. They are cached and re-encoded chunk by chunk like the main inputs, before them, so
            the last (synchronised) backward is still a main chunk through both towers.

    Returns:
        the detached loss and embeddings, see `GradCacheOutput`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if batch_size(images) != batch_size(texts):
        raise ValueError(f"images ({batch_size(images)} rows) and texts ({batch_size(texts)} rows) differ")
    backward = backward or Tensor.backward
    image_chunks, text_chunks = split_batch(images, chunk_size), split_batch(texts, chunk_size)
    cuda_devices = _cuda_devices(images, texts)

    extra_chunks = [(encoder, split_batch(batch, chunk_size)) for encoder, batch in extra_inputs]

    # 1. Embed without a graph, remembering each chunk's RNG state.
    random_states, image_parts, text_parts = [], [], []
    extra_states: list[list[_RandomState]] = [[] for _ in extra_chunks]
    extra_parts: list[list[Tensor]] = [[] for _ in extra_chunks]
    with torch.no_grad():
        for index, (encoder, chunks) in enumerate(extra_chunks):
            for chunk in chunks:
                extra_states[index].append(_RandomState(cuda_devices))
                extra_parts[index].append(encoder(chunk))
        for image_chunk, text_chunk in zip(image_chunks, text_chunks):
            random_states.append(_RandomState(cuda_devices))
            image_parts.append(encode_image(image_chunk))
            text_parts.append(encode_text(text_chunk))
    after_first_pass = _RandomState(cuda_devices)

    # 2. Loss on leaf embeddings. autograd.grad (not .backward) so that nothing lands in .grad yet: under DDP
    # every parameter gradient has to arrive inside the one synchronised backward of the last chunk.
    image_emb, text_emb = _as_loss_input(image_parts), _as_loss_input(text_parts)  # [B, D] leaves
    extra_embs = [_as_loss_input(parts) for parts in extra_parts]  # [M, D] leaves
    leaves = [image_emb, text_emb, *extra_embs]
    loss = loss_fn(*leaves)
    loss_params = _loss_parameters(loss, exclude=leaves)
    grads = torch.autograd.grad(loss, [*leaves, *loss_params], allow_unused=True)
    if grads[0] is None or grads[1] is None:
        raise ValueError("loss_fn must depend on both the image and the text embeddings it is given")
    image_grads = grads[0].split(chunk_size)  # [b, D] per chunk
    text_grads = grads[1].split(chunk_size)
    extra_grads = grads[2 : len(leaves)]
    loss_param_grads = [(p, g) for p, g in zip(loss_params, grads[len(leaves) :]) if g is not None]

    # 3./4. Re-encode with a graph; d loss/d params = sum over chunks of (d emb_chunk/d params)^T cached_grad.
    # The extra inputs first, every one inside no_sync; an unused one (zero gradient) is skipped.
    for index, (encoder, chunks) in enumerate(extra_chunks):
        if extra_grads[index] is None:
            continue
        for chunk, state, grad in zip(chunks, extra_states[index], extra_grads[index].split(chunk_size)):
            with contextlib.nullcontext() if no_sync is None else no_sync():
                state.restore()
                backward((encoder(chunk).to(grad.dtype) * grad).sum())
    last = len(image_chunks) - 1
    for index, (image_chunk, text_chunk) in enumerate(zip(image_chunks, text_chunks)):
        sync_context = contextlib.nullcontext() if no_sync is None or index == last else no_sync()
        with sync_context:
            random_states[index].restore()
            image_chunk_emb = encode_image(image_chunk)  # [b, D]
            text_chunk_emb = encode_text(text_chunk)  # [b, D]
            surrogate = (image_chunk_emb.to(image_grads[index].dtype) * image_grads[index]).sum() + (
                text_chunk_emb.to(text_grads[index].dtype) * text_grads[index]
            ).sum()
            if index == last:
                # The loss parameters' gradient joins the synchronised backward (its value is exact: linear).
                for param, grad in loss_param_grads:
                    surrogate = surrogate + (param * grad).sum()
            backward(surrogate)
    after_first_pass.restore()  # the rest of the step sees the RNG as if the batch had been encoded once

    return GradCacheOutput(
        loss=loss.detach(),
        image_emb=image_emb.detach(),
        text_emb=text_emb.detach(),
        num_chunks=len(image_chunks),
    )


def lightning_no_sync(module: Any) -> Callable[[], contextlib.AbstractContextManager]:
    """The `no_sync` factory of a LightningModule's strategy.

    Lightning wraps the module in DistributedDataParallel as `trainer.strategy.model`; its parallel strategies
    expose `block_backward_sync()`, which enters that wrapper's `no_sync()` (and does nothing when the model is
    not wrapped). Single-device strategies have no such method, so a null context is returned. A network
    sharded with FSDP2 (`mmret.training.fsdp.shard_dual_encoder`, under ModelParallelStrategy, where
    `block_backward_sync` does nothing) gets `gradcache_no_sync` instead: no reduce-scatter but the last chunk's.
    """
    from mmret.training.fsdp import gradcache_no_sync

    sharded = next((m for m in module.modules() if hasattr(m, "set_requires_gradient_sync")), None)
    if sharded is not None:
        return gradcache_no_sync(sharded)
    block = getattr(module.trainer.strategy, "block_backward_sync", None)
    return block if block is not None else contextlib.nullcontext


def lightning_gradcache_backward(
    module: Any,
    encode_image: Encoder,
    encode_text: Encoder,
    images: Batch,
    texts: Batch,
    loss_fn: Callable[..., Tensor],
    chunk_size: int,
    extra_inputs: Sequence[tuple[Encoder, Batch]] = (),
) -> GradCacheOutput:
    """`gradcache_backward` from inside a LightningModule's `training_step` under manual optimisation.

    Each chunk's surrogate goes through `module.manual_backward`, which (a) applies the precision plugin's
    loss scaling (16-mixed GradScaler: every parameter gradient gets the same scale once, because the cached
    embedding gradients are unscaled float32, and the optimizer step unscales), and (b) under DDP calls
    DistributedDataParallel's prepare-for-backward — required because the training_step itself runs inside
    DDP's forward, so without it the last chunk's backward would not all-reduce. Chunks but the last run in
    `trainer.strategy.block_backward_sync()`, so gradients are all-reduced once per step. Lightning's
    `on_before_backward` / `on_after_backward` hooks fire once per chunk.

    Usage (zero the gradients before, step after):

        opt = self.optimizers(); opt.zero_grad()
        out = lightning_gradcache_backward(self, self.encode_image, self.encode_text, images, texts,
                                           lambda i, t: self.loss(i, t, self.logit_scale.exp()), chunk_size=64)
        opt.step()
    """
    return gradcache_backward(
        encode_image,
        encode_text,
        images,
        texts,
        loss_fn,
        chunk_size,
        no_sync=lightning_no_sync(module),
        backward=module.manual_backward,
        extra_inputs=extra_inputs,
    )
