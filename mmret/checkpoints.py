"""Loading mmret training checkpoints, and `mmret export` (a checkpoint -> open_clip's hub layout).

    mmret export runs/digits_clip/20261126-150000/checkpoints/last.ckpt --output exported/digits_clip
    python -c "import open_clip; open_clip.create_model_and_transforms('local-dir:exported/digits_clip')"

`load_dual_encoder` (and `load_cross_encoder` for rerankers) is the one way the CLI commands (export, eval, mine) and the notebooks read a dual-encoder
checkpoint: it rebuilds the network from the saved hyperparameters WITHOUT downloading its original pretrained
weights (the checkpoint holds the trained ones), then loads the state dict.
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path

import torch

from mmret.errors import UsageError

_CLASS_OF_KIND = {"dual_encoder": "DualEncoder", "cross_encoder": "CrossEncoder"}


def read_checkpoint(path: str | os.PathLike, expected_kind: str) -> dict:
    """The checkpoint dict at `path`, checked to be an mmret checkpoint of `expected_kind` (e.g. dual_encoder)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; expected a .ckpt file written by `mmret fit`")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise UsageError(
            f"{path} is not a readable checkpoint ({type(err).__name__}); expected a .ckpt file "
            "written by `mmret fit`"
        ) from None
    kind = checkpoint.get("mmret", {}).get("kind") if isinstance(checkpoint, dict) else None
    if kind != expected_kind:
        found = f"an mmret {kind} checkpoint" if kind else "not an mmret checkpoint"
        raise UsageError(
            f"{path} is {found}; expected an mmret {expected_kind.replace('_', ' ')} checkpoint "
            f"(`mmret fit` with model class mmret.modules.{_CLASS_OF_KIND.get(expected_kind, 'DualEncoder')})"
        )
    return checkpoint


def load_dual_encoder(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The trained `DualEncoder` of a checkpoint, in eval mode on `device`."""
    from mmret.modules import DualEncoder

    checkpoint = read_checkpoint(path, "dual_encoder")
    allowed = set(inspect.signature(DualEncoder.__init__).parameters) - {"self"}
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k in allowed}
    hparams["pretrained"] = None  # the trained weights come from the checkpoint, not from a download
    hparams["compile"] = False
    module = DualEncoder(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    return module.to(device).eval()


def load_cross_encoder(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The trained `CrossEncoder` (reranker) of a checkpoint, in eval mode on `device`.

    The towers are rebuilt from the architecture name saved in the checkpoint, so neither the dual-encoder
    checkpoint it was initialised from nor any pretrained download is needed.
    """
    from mmret.modules import CrossEncoder

    checkpoint = read_checkpoint(path, "cross_encoder")
    allowed = set(inspect.signature(CrossEncoder.__init__).parameters) - {"self"}
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k in allowed}
    hparams.update(model=checkpoint["mmret"]["model"], pretrained=None, dual_encoder=None)
    module = CrossEncoder(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    return module.to(device).eval()


def _checkpoint_kind(path: str | os.PathLike) -> str | None:
    """The `mmret.kind` of a checkpoint file, None when unreadable (the loader then says what is wrong)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # not a zip checkpoint, missing, ...: left to read_checkpoint's messages
        return None
    return checkpoint.get("mmret", {}).get("kind") if isinstance(checkpoint, dict) else None


def export_cross_encoder(path: str | os.PathLike, output: str | os.PathLike) -> Path:
    """A reranker checkpoint as `reranker_model.safetensors` (its state dict) + `reranker_config.json` (the
    `CrossEncoder` arguments, towers by architecture name), written to a temporary sibling and renamed."""
    import json
    import shutil

    from safetensors.torch import save_file

    checkpoint = read_checkpoint(path, "cross_encoder")
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        hparams.update(model=checkpoint["mmret"]["model"], pretrained=None, dual_encoder=None)
        config = {"class": "mmret.modules.CrossEncoder", "init_args": hparams}
        (tmp / "reranker_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        state = {k: v.contiguous() for k, v in checkpoint["state_dict"].items()}
        save_file(state, str(tmp / "reranker_model.safetensors"))
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .ckpt written by `mmret fit` (dual encoder or reranker)")
    parser.add_argument("--output", required=True, help="directory to write (open_clip hub layout)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument(
        "--hf-model-name",
        default=None,
        help="hub id to record for a Hugging Face text tower (before uploading the export)",
    )


def run(args: argparse.Namespace) -> int:
    from mmret.models import export_open_clip

    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise UsageError(f"output {output} exists and is not empty; pass --overwrite to replace it")
    if _checkpoint_kind(args.checkpoint) == "cross_encoder":
        written = export_cross_encoder(args.checkpoint, output)
        print(f"exported reranker to {written}: reranker_config.json + reranker_model.safetensors")
        return 0
    module = load_dual_encoder(args.checkpoint)
    written = export_open_clip(
        module.model, None, output, overwrite=args.overwrite, hf_model_name=args.hf_model_name
    )
    print(f"exported to {written}: load with open_clip.create_model_and_transforms('local-dir:{written}')")
    return 0
