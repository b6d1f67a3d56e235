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
`mmret.training.DualEncoder` and `CrossEncoder` do all this themselves under `FSDP2Strategy` below (the
Trainer's `strategy: fsdp2`), and evaluate inside `gathered(model)`.

Run the tests: `.venv/bin/pytest tests/test_fsdp2.py -m ddp` (2 gloo ranks on CPU).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from mmret import distributed
from mmret.errors import UsageError
from mmret.training.checkpoint_io import SHARDED_METADATA

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


class CallRoot(nn.Module):
    """The FSDP2 root of a network whose parts are called one at a time rather than through one forward (the
    reranker: image tower, text tower, fusion layers): `root(fn, *args)` runs `fn(*args)` inside the root's
    forward, so its hooks gather what no block holds (embeddings, projections, norms, the fusion's
    projections and head) and reshard it after the backward."""

    def __init__(self, **parts: nn.Module | None) -> None:
        super().__init__()
        for name, part in parts.items():
            if part is not None:
                self.add_module(name, part)

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(*args, **kwargs)


def shard_reranker(
    towers: nn.Module, fusion: nn.Module, pixel_stem: nn.Module | None = None, **options
) -> CallRoot:
    """FSDP2 for the cross-encoder's parts: each tower block and each fusion layer a unit, then a `CallRoot`
    over towers, fusion and pixel stem (which the caller keeps outside its own module tree, so parameter
    names do not change). Options as `shard_dual_encoder`'s. Returns the root: call the parts through it."""
    mesh, mixed_precision = options.pop("mesh", None), options.pop("mixed_precision", None)
    if mesh is not None:
        options["mesh"] = mesh
    if mixed_precision is not None:
        options["mp_policy"] = mixed_precision
    blocks = [*residual_blocks(towers.visual), *residual_blocks(_text_tower(towers) or nn.Module())]
    for block in [*blocks, *getattr(fusion, "layers", [])]:
        distributed.fully_shard(block, **options)
    root = CallRoot(towers=towers, fusion=fusion, pixel_stem=pixel_stem)
    distributed.fully_shard(root, ignored_params=set(replicated_parameters(root)), **options)
    return root


def clip_sharded_gradients(
    module: nn.Module, optimizer, clip_value: float, algorithm: str | None, group=None
) -> None:
    """Lightning's gradient clipping (`trainer.gradient_clip_val` / `gradient_clip_algorithm`) for a module with
    sharded and replicated parameters: `clip_grad_value` for "value", else `clip_grad_norm` over `group`."""
    parameters = [p for param_group in optimizer.param_groups for p in param_group["params"]]
    if algorithm == "value":
        clip_grad_value(parameters, clip_value)
    else:
        clip_grad_norm(parameters, clip_value, group=group)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or the network of a LightningModule) was sharded with FSDP2."""
    return distributed.is_fsdp_module(model)


def _units(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if distributed.is_fsdp_module(module)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every FSDP2 unit of `model` all-gathered once, for the block: forwards inside it run no collective.

    Evaluation needs this: ranks embed different numbers of batches (the last one short or missing), and a
    sharded forward is a collective every rank must join. The full parameters are held for the block (no
    gradients or optimizer state, so about one model's size per rank); they are resharded at its end."""
    units = _units(model)
    saved = []
    for unit in units:
        group = unit._get_fsdp_state()._fsdp_param_group  # the unit's FSDPParamGroup (None: no parameters)
        saved.append((group, getattr(group, "post_forward_mesh_info", None)))
        if group is not None:
            group.post_forward_mesh_info = None  # do not reshard after forward while gathered
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for group, info in saved:
            if group is not None:
                group.post_forward_mesh_info = info
        for unit in units:
            unit.reshard()


class GatheredDuringValidation:
    """`gathered` held from a validation epoch's start hook to its end hook (two calls, not one block).

    self._val_gather.start(network)   # on_validation_epoch_start; None or an unsharded network: nothing
    self._val_gather.stop()           # on_validation_epoch_end, in a `finally`
    """

    def __init__(self) -> None:
        self._stack: contextlib.ExitStack | None = None

    def start(self, model: nn.Module | None) -> None:
        self.stop()
        if model is not None and is_sharded(model):
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(gathered(model))

    def stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float, group=None) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (2-norm) over sharded (DTensor) and replicated gradients together.

    The total norm is that of the whole, unsharded gradient: the squared norms of the local shards are summed
    over the ranks of `group` (the data-parallel group), the replicated gradients (equal on every rank) are
    counted once. Every gradient is then scaled by min(1, max_norm / (norm + 1e-6)), as torch does.

    Returns:
        the total norm before clipping (a 0-dim tensor, equal on every rank).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    sharded = [g.to_local() for g in grads if distributed.is_dtensor(g)]
    plain = [g for g in grads if not distributed.is_dtensor(g)]
    device = (sharded or plain)[0].device
    squares = torch.zeros((), device=device, dtype=torch.float32)
    for g in sharded:
        squares += g.float().pow(2).sum()
    squares = distributed.all_reduce_sum_over(squares, group)
    for g in plain:
        squares += g.float().pow(2).sum().to(device)
    total = squares.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in sharded + plain:
        g.mul_(scale.to(g.device, g.dtype))
    return total


@torch.no_grad()
def clip_grad_value(parameters: Iterable[nn.Parameter], clip_value: float) -> None:
    """`torch.nn.utils.clip_grad_value_` over sharded and replicated gradients (element-wise, so per shard)."""
    for param in parameters:
        if param.grad is not None:
            grad = param.grad.to_local() if distributed.is_dtensor(param.grad) else param.grad
            grad.clamp_(-clip_value, clip_value)


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
        if isinstance(text, Mapping):  # a Hugging Face tokenizer's output: open_clip's HF tower takes the ids
            text = text["input_ids"]
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


# --- Lightning --------------------------------------------------------------------------------------------------


def shard_options_of(strategy) -> dict | None:
    """The `shard_dual_encoder` options for a LightningModule under `strategy`; None when it does not shard.

    `FSDP2Strategy` gives its own (mesh, mixed precision, resharding); Lightning's `ModelParallelStrategy` with
    tensor_parallel_size 1 shards over its data-parallel mesh in full precision."""
    if strategy is None or not isinstance(strategy, ModelParallelStrategy):
        return None
    mesh = strategy.device_mesh
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise UsageError(
            f"trainer.strategy has tensor_parallel_size {mesh['tensor_parallel'].size()}; mmret shards its "
            "models over data-parallel ranks only: use strategy fsdp2 (or tensor_parallel_size 1)"
        )
    if isinstance(strategy, FSDP2Strategy):
        return strategy.shard_options()
    return {"mesh": mesh["data_parallel"]}


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over every rank, for mmret's LightningModules: the Trainer's `strategy: fsdp2`.

    Lightning's `ModelParallelStrategy` with `data_parallel_size` = the world size and `tensor_parallel_size` 1,
    plus mixed precision for the shards and checkpoint folders that are written whole or not at all.
    `DualEncoder.configure_model` and `CrossEncoder.configure_model` shard with these options.

        mmret fit -c experiments/digits_clip.yaml --trainer.devices 2 --trainer.strategy fsdp2
        mmret fit ... --trainer.strategy mmret.training.fsdp.FSDP2Strategy \\
            --trainer.strategy.mixed_precision bf16

    Args:
        mixed_precision: "bf16": parameters all-gathered and used in bfloat16, gradients reduce-scattered in
            float32, the sharded weights and the optimizer state kept in float32 (FSDP2's MixedPrecisionPolicy;
            keep `trainer.precision` 32-true). None: float32 throughout.
        reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3); False keeps
            them until the backward (more memory, fewer all-gathers).
        save_distributed_checkpoint: True: each checkpoint (`last.ckpt`, `stepNNNNNNN.ckpt`) is a folder in
            which every rank writes its own shards (torch.distributed.checkpoint) plus `meta.pt` (step, loops,
            hyperparameters); `mmret export / eval / index` and `DualEncoder.from_checkpoint` read such folders
            directly. False: the full state is gathered on rank 0 and written as one file.
        process_group_backend: "nccl" on GPUs, "gloo" on CPUs by default.
    """

    def __init__(
        self,
        mixed_precision: str | None = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        if mixed_precision not in (None, "bf16", "fp16"):
            raise UsageError(
                f"trainer.strategy.mixed_precision is {mixed_precision!r}; expected 'bf16', 'fp16' or null"
            )
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.mixed_precision = mixed_precision
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # every rank is a data-parallel rank (ModelParallelStrategy's "auto" means one per node)
        self._data_parallel_size = self.num_processes * self.num_nodes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard_options(self) -> dict:
        options: dict = {
            "mesh": self.device_mesh["data_parallel"],
            "reshard_after_forward": self.reshard_after_forward,
        }
        if self.mixed_precision is not None:
            dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
            options["mixed_precision"] = distributed.mixed_precision_policy(
                param_dtype=dtype, reduce_dtype=torch.float32
            )
        return options

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """A sharded checkpoint folder, written beside its final name and renamed into place once every rank
        has written its shards: a run killed at any moment leaves the previous checkpoint or the new one."""
        if not self._save_distributed_checkpoint or "://" in str(filepath):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = Path(self.broadcast(str(filepath)))
        token = self.broadcast(f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        work = target.parent / f".{target.name}.{token}.tmp"
        if self.global_rank == 0:
            work.mkdir(parents=True)
        self.barrier("mmret_sharded_checkpoint_start")
        state = {"state_dict": checkpoint.pop("state_dict")}
        for index, optimizer_state in enumerate(checkpoint.pop("optimizer_states", [])):
            state[f"optimizer_{index}"] = optimizer_state
        try:
            distributed.save_sharded(state, work)
            if self.global_rank == 0:
                with open(work / SHARDED_METADATA, "wb") as handle:
                    torch.save(checkpoint, handle)
                    handle.flush()
                    os.fsync(handle.fileno())
        except BaseException:
            if self.global_rank == 0:
                shutil.rmtree(work, ignore_errors=True)
            raise
        self.barrier("mmret_sharded_checkpoint_written")
        if self.global_rank == 0:
            old = target.parent / f".{target.name}.old-{token}.tmp"
            if target.is_dir() and not target.is_symlink():
                target.rename(old)
            elif target.exists() or target.is_symlink():
                target.unlink()
            work.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("mmret_sharded_checkpoint_done")


def register_strategy() -> None:
    """Make `strategy: fsdp2` a name the Trainer (and `mmret fit --trainer.strategy fsdp2`) knows."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register(
            "fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) data parallelism over every rank (mmret)"
        )


register_strategy()
