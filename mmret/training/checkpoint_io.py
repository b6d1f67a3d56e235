"""Reading and writing mmret training checkpoints, and the reranker's export.

    checkpoint = read_checkpoint(path, "dual_encoder")      # UsageError unless an mmret dual-encoder checkpoint
    DualEncoder.from_checkpoint(path), CrossEncoder.from_checkpoint(path)   # build on these
    Trainer(plugins=[AtomicCheckpointIO()])                 # what `mmret fit` saves with
    export_cross_encoder(path, "exported/reranker")         # reranker_config.json + reranker_model.safetensors

Every checkpoint `mmret fit` writes carries `checkpoint["mmret"] = {"kind": "dual_encoder" | "cross_encoder",
"model": <architecture name>, ...}`; that is how a command knows what it was given. A checkpoint written under
`--trainer.strategy fsdp2` is a folder (each rank's shards + meta.pt); `read_checkpoint` reads it the same way.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mmret import distributed
from mmret.errors import UsageError
from mmret.io import atomic_file, atomic_output_dir, follow_umask

SHARDED_METADATA = "meta.pt"  # a sharded checkpoint folder's non-tensor part (Lightning's name)
_CLASS_OF_KIND = {"dual_encoder": "DualEncoder", "cross_encoder": "CrossEncoder"}


def read_checkpoint(path: str | os.PathLike, expected_kind: str) -> dict:
    """The checkpoint dict at `path`, checked to be an mmret checkpoint of `expected_kind` (e.g. dual_encoder)."""
    path = Path(path)
    if path.is_dir() and (path / SHARDED_METADATA).is_file():
        checkpoint = read_sharded_checkpoint(path)
    elif not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; expected a .ckpt file written by `mmret fit`")
    else:
        checkpoint = _load_file(path)
    kind = checkpoint.get("mmret", {}).get("kind") if isinstance(checkpoint, dict) else None
    if kind != expected_kind:
        found = f"an mmret {kind} checkpoint" if kind else "not an mmret checkpoint"
        raise UsageError(
            f"{path} is {found}; expected an mmret {expected_kind.replace('_', ' ')} checkpoint "
            f"(`mmret fit` with model class mmret.training.{_CLASS_OF_KIND.get(expected_kind, 'DualEncoder')})"
        )
    return checkpoint


def is_checkpoint_path(path: str | os.PathLike) -> bool:
    """Whether `path` names a checkpoint: a file, or a sharded checkpoint folder (with its meta.pt)."""
    path = Path(path)
    return path.is_file() or (path.is_dir() and (path / SHARDED_METADATA).is_file())


def read_sharded_checkpoint(path: str | os.PathLike) -> dict:
    """A sharded checkpoint folder (`mmret fit --trainer.strategy fsdp2`: torch.distributed.checkpoint shards +
    meta.pt) as the dict a one-file checkpoint holds: meta.pt's entries and the full `state_dict` (plain CPU
    tensors, whatever the number of ranks that wrote it). The optimizer state is not read.

    Raises:
        UsageError: the folder is incomplete (a save cut short) or its files unreadable.
    """
    path = Path(path)
    if not distributed.sharded_files_intact(path):
        raise UsageError(
            f"{path} is an incomplete sharded checkpoint (a shard file or its .metadata is missing or short); "
            "expected a folder written whole by `mmret fit --trainer.strategy fsdp2`"
        )
    checkpoint = _load_file(path / SHARDED_METADATA)
    try:
        checkpoint["state_dict"] = distributed.load_sharded_keys(path, {"state_dict"})["state_dict"]
    except Exception as err:  # torch.distributed.checkpoint raises CheckpointException and others
        raise UsageError(
            f"{path}: its shards are not readable ({type(err).__name__}); expected a folder written whole by "
            "`mmret fit --trainer.strategy fsdp2`"
        ) from None
    return checkpoint


def _load_file(path: Path) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise UsageError(
            f"{path} is not a readable checkpoint ({type(err).__name__}); expected a .ckpt file "
            "written by `mmret fit`"
        ) from None
    return checkpoint


def hyperparameters_for(module_class: type, checkpoint: dict) -> dict:
    """The checkpoint's saved hyperparameters that `module_class.__init__` accepts."""
    allowed = set(inspect.signature(module_class.__init__).parameters) - {"self"}
    return {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k in allowed}


def load_weights(module: torch.nn.Module, state_dict: dict, source: str | os.PathLike) -> None:
    """Load `state_dict` into `module`; weights that do not fit (missing, unexpected or of another shape: a
    modified checkpoint, or hyperparameters edited after training) are a UsageError naming `source`."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as err:
        details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        first = details[0] if details else str(err).splitlines()[0]
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        raise UsageError(
            f"{source}: its weights do not fit the architecture it records: {first}{more}; expected a "
            "checkpoint or export written by mmret, unmodified"
        ) from None


def checkpoint_kind(path: str | os.PathLike) -> str | None:
    """The `mmret.kind` of a checkpoint file, None when unreadable (the loader then says what is wrong)."""
    path = Path(path)
    if path.is_dir():  # a sharded checkpoint folder: its meta.pt has the kind
        path = path / SHARDED_METADATA
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # not a zip checkpoint, missing, ...: left to read_checkpoint's messages
        return None
    return checkpoint.get("mmret", {}).get("kind") if isinstance(checkpoint, dict) else None


def export_cross_encoder(path: str | os.PathLike, output: str | os.PathLike, card=None) -> Path:
    """A reranker checkpoint as `reranker_model.safetensors` (its state dict) + `reranker_config.json` (the
    `CrossEncoder` arguments, towers by architecture name) + a model card README.md (`card`: a
    `mmret.models.model_card.CardInfo`; None: one without training details); the folder appears whole or not at
    all (an existing one is replaced). LoRA adapters (`model.lora`) are merged into the tower weights: the export
    is a plain reranker (`lora: null`)."""
    from safetensors.torch import save_file

    from mmret.models.model_card import CardInfo, write_model_card

    checkpoint = read_checkpoint(path, "cross_encoder")
    output = Path(output)
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    hparams.update(model=checkpoint["mmret"]["model"], pretrained=None, dual_encoder=None)
    state_dict = checkpoint["state_dict"]
    if any("lora_" in key for key in state_dict):
        state_dict = _merged_reranker_state(path)
        hparams["lora"] = None
    with atomic_output_dir(output, overwrite=True) as work:
        config = {"class": "mmret.training.CrossEncoder", "init_args": hparams}
        (work / "reranker_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        state = {k: v.contiguous() for k, v in state_dict.items()}
        save_file(state, str(work / "reranker_model.safetensors"))
        follow_umask(work / "reranker_model.safetensors")
        write_model_card(work, card or CardInfo(model_name=output.resolve().name), "mmret", "reranker")
    return output


def _merged_reranker_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a LoRA reranker checkpoint with its adapters merged into the tower weights: what a
    reranker built with `lora: null` loads."""
    from mmret.training.cross_encoder import CrossEncoder  # imports this module: import it only when needed

    return CrossEncoder.from_checkpoint(path).state_dict()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in its own directory, fsyncs, then renames it into place
    (`mmret.io.atomic_file`: the file follows the umask, 0644 under 022).

    A run killed at any moment (SIGKILL, preemption, node failure) leaves either the previous checkpoint or the new
    one, never a truncated file. (Lightning's default stages local files through the system temp directory, and
    a move across file systems is a copy that can be cut short.) A full or read-only file system is a
    `UsageError` ("cannot write RUN/checkpoints/last.ckpt: No space left on device (errno 28); ..."): the fit
    stops with one line, the previous checkpoint intact, so running the same command again resumes from it.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own transactional upload
            return super().save_checkpoint(checkpoint, path, storage_options)
        # A full or read-only run directory: UsageError naming the file, the old checkpoint left as it was.
        with atomic_file(path, binary=True, option="--run_dir") as handle:
            torch.save(checkpoint, handle)
