"""`mmret export`: a trained checkpoint as files other tools load.

    mmret export runs/digits_clip/20261126-150000/checkpoints/last.ckpt --output exported/digits_clip
    python -c "import open_clip; open_clip.create_model_and_transforms('local-dir:exported/digits_clip')"

A dual encoder goes out in open_clip's hub layout (`open_clip_config.json` + `open_clip_model.safetensors`,
`mmret.models.export`); a reranker as `reranker_config.json` + `reranker_model.safetensors`
(`mmret.training.checkpoint_io.export_cross_encoder`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmret.errors import UsageError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmret export`."""
    parser.add_argument("checkpoint", help="a .ckpt written by `mmret fit` (dual encoder or reranker)")
    parser.add_argument("--output", required=True, help="directory to write (open_clip hub layout)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument(
        "--hf-model-name",
        default=None,
        help="hub id to record for a Hugging Face text tower (before uploading the export)",
    )


def run(args: argparse.Namespace) -> int:
    """Run `mmret export` with parsed arguments."""
    from mmret.io import check_output_parent
    from mmret.models import export_open_clip
    from mmret.training import DualEncoder
    from mmret.training.checkpoint_io import checkpoint_kind, export_cross_encoder

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} exists and is not a folder; expected a new or empty folder")
    check_output_parent(output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise UsageError(f"output {output} exists and is not empty; pass --overwrite to replace it")
    if checkpoint_kind(args.checkpoint) == "cross_encoder":
        written = export_cross_encoder(args.checkpoint, output)
        print(f"exported reranker to {written}: reranker_config.json + reranker_model.safetensors")
        return 0
    module = DualEncoder.from_checkpoint(args.checkpoint)
    written = export_open_clip(
        module.model, None, output, overwrite=args.overwrite, hf_model_name=args.hf_model_name
    )
    print(f"exported to {written}: load with open_clip.create_model_and_transforms('local-dir:{written}')")
    return 0
