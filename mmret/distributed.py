"""Collective operations for training and evaluation: the only module in mmret that imports torch.distributed.

Everything here also works without a process group (a single process is "rank 0 of 1"), so losses and
evaluation code call these functions unconditionally. Tests fake a world by monkeypatching the module-level
functions (`get_rank`, `get_world_size`, ...) or run them for real with `tests/ddp_helpers.run_ddp`.

    from mmret import distributed
    all_text_emb = distributed.all_gather_with_grad(text_emb)       # [world * B, D], exact gradients
    all_ids = distributed.all_gather_variable(ids)                  # eval: ranks may hold different counts

Gradient convention of `all_gather_with_grad` (why the backward sums across ranks): rank r's loss L_r reads
every rank's embeddings, so the gradient that belongs to rank r's embeddings is d(sum_s L_s)/d(emb_r); the
backward therefore sum-reduces the incoming gradient over ranks and keeps this rank's slice. DDP then averages
parameter gradients over ranks, which makes a per-rank mean loss reproduce the single-process gradient of the
global mean (see `mmret.losses` and tests/test_losses_ddp.py).

Run the tests: `.venv/bin/pytest tests/test_losses_ddp.py -m ddp`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group is initialised (with any number of ranks)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the default group, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of ranks in the default group, 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns this rank's slice of the rank-summed gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        rank = get_rank()
        ctx.start = sum(sizes[:rank])
        ctx.length = sizes[rank]
        return _gather_padded(tensor, sizes)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # Every rank's loss may depend on this rank's rows, so their gradient is the sum over ranks of each
        # rank's incoming gradient. all_reduce + slice rather than reduce_scatter: gloo has no
        # reduce_scatter and these are [N, D] embedding gradients, small next to the model's own gradients.
        grad = grad_output.contiguous().clone()  # all_reduce is in place; autograd owns grad_output
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.length], None


def _gather_padded(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Gather dim-0 blocks of (possibly) different lengths by padding to the longest; concatenated in rank order."""
    max_size = max(sizes)
    tensor = tensor.contiguous()
    if tensor.shape[0] < max_size:
        padding = tensor.new_zeros((max_size - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, padding])
    blocks = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(blocks, tensor)
    return torch.cat([block[:size] for block, size in zip(blocks, sizes)])


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0, in rank order, keeping exact gradients.

    Every rank must pass the same shape (equal per-rank batch sizes, as DistributedSampler gives); use
    `all_gather_variable` when lengths differ. Without a process group the input is returned unchanged.

    Args:
        tensor: `[B, ...]` local rows.

    Returns:
        `[world_size * B, ...]`; its gradient flows back to every rank's rows (summed over ranks).
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, [tensor.shape[0]] * world_size)


def all_gather_no_grad(tensor: torch.Tensor, keep_local_grad: bool = True) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 without a gradient path to other ranks.

    This is open_clip's `gather_with_grad=False` form: the other ranks' rows are constants. With
    `keep_local_grad` the local slice is the caller's (grad-carrying) tensor itself, so gradient still reaches
    this rank's rows through the gathered matrix.

    Args:
        tensor: `[B, ...]` local rows (same shape on every rank).
        keep_local_grad: put the grad-carrying local tensor back in this rank's slice.

    Returns:
        `[world_size * B, ...]` in rank order.
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    with torch.no_grad():
        blocks = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(blocks, tensor.contiguous())
    if keep_local_grad:
        blocks[get_rank()] = tensor
    return torch.cat(blocks)


def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 when ranks hold different numbers of rows.

    Used by evaluation to gather embeddings and ids of the last, uneven shard. Lengths are exchanged first, each
    block is padded to the longest for the collective, and the padding is dropped again. The result keeps an
    exact gradient (as `all_gather_with_grad`) when `tensor` requires grad.

    Args:
        tensor: `[n_rank, ...]`; trailing dims and dtype must agree across ranks, `n_rank` may differ (even 0).

    Returns:
        `[sum of n_rank, ...]` in rank order.
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    local_size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.empty_like(local_size) for _ in range(world_size)]
    dist.all_gather(sizes, local_size)
    sizes = [int(size.item()) for size in sizes]
    if tensor.requires_grad:
        return _AllGatherWithGrad.apply(tensor, sizes)
    return _gather_padded(tensor, sizes)


def all_gather_objects(value: object) -> list:
    """Every rank's picklable `value`, in rank order (a list of one without a process group)."""
    if get_world_size() == 1:
        return [value]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over ranks, as a new tensor (the input is left untouched; no gradient)."""
    if get_world_size() == 1:
        return tensor.detach().clone()
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def _exchange(tensor: torch.Tensor, send_to: int, recv_from: int) -> torch.Tensor:
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor.contiguous(), send_to),
        dist.P2POp(dist.irecv, received, recv_from),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _NeighbourExchange(torch.autograd.Function):
    """Send to one rank and receive from another; the gradient travels the opposite way."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, send_to: int, recv_from: int) -> torch.Tensor:
        ctx.send_to, ctx.recv_from = send_to, recv_from
        return _exchange(tensor, send_to, recv_from)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # The rank we sent to holds the gradient of what it received from us: get it back from there.
        return _exchange(grad_output, send_to=ctx.recv_from, recv_from=ctx.send_to), None, None


def neighbour_exchange(tensor: torch.Tensor, send_to: int, recv_from: int) -> torch.Tensor:
    """Send `tensor` to rank `send_to` and return the same-shaped tensor received from rank `recv_from`.

    Every rank must call it with matching pairs (a ring: send right, receive from the left). Differentiable:
    the backward sends the received tensor's gradient back to `recv_from`, so the loss on the receiving rank
    reaches the sender's embeddings (as with `all_gather_with_grad`, DDP averaging makes it exact).

    Args:
        tensor: block to send; all ranks use the same shape.
        send_to: destination rank.
        recv_from: source rank.

    Returns:
        the block sent by `recv_from`.
    """
    if tensor.requires_grad:
        return _NeighbourExchange.apply(tensor, send_to, recv_from)
    return _exchange(tensor, send_to, recv_from)


def fully_shard(module, **options):
    """`torch.distributed.fsdp.fully_shard` (FSDP2) on `module`, kept here so mmret imports torch.distributed
    in this module only; see `mmret.training.fsdp` for which submodules of a dual encoder become units."""
    from torch.distributed.fsdp import fully_shard as _fully_shard

    return _fully_shard(module, **options)


def mixed_precision_policy(**options):
    """`torch.distributed.fsdp.MixedPrecisionPolicy(**options)` (param_dtype, reduce_dtype, ...)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(**options)


def is_fsdp_module(module) -> bool:
    """Whether `fully_shard` was applied to `module` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_dtensor(tensor) -> bool:
    """Whether `tensor` is a DTensor (an FSDP2 shard)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def all_reduce_sum_over(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of `tensor` over the ranks of `group` (default: every rank); a copy, `tensor` unchanged."""
    out = tensor.clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def save_sharded(state: dict, folder) -> None:
    """`torch.distributed.checkpoint.save` of `state` (DTensor shards and plain tensors) into `folder`: each
    rank writes its own shards, replicated tensors are written once."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(folder))


def load_sharded_keys(folder, keys: set[str]) -> dict:
    """The entries `keys` of a `torch.distributed.checkpoint` folder, as full plain tensors on the CPU, without a
    process group (what an export or an evaluation of a sharded checkpoint reads)."""
    import warnings

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
        return _load_state_dict_from_keys(keys=keys, checkpoint_id=str(folder))


def sharded_files_intact(folder) -> bool:
    """Whether a `torch.distributed.checkpoint` folder is complete: its `.metadata` reads and every byte range
    it lists is inside an existing file (a save cut short leaves a missing or short shard file)."""
    import os

    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception:  # missing or truncated .metadata: many types
        return False
    ends: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        name = str(item.relative_path)
        ends[name] = max(ends.get(name, 0), int(item.offset) + int(item.length))
    for name, end in ends.items():
        path = os.path.join(str(folder), name)
        if not os.path.isfile(path) or os.path.getsize(path) < end:
            return False
    return True
