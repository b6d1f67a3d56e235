"""`mmret export`: a trained checkpoint as files open_clip, transformers or sentence-transformers load.

    mmret export runs/digits_clip/20261126-150000/checkpoints/last.ckpt --output exported/digits_clip
    python -c "import open_clip; open_clip.create_model_and_transforms('local-dir:exported/digits_clip')"
    mmret export CKPT --format transformers --results results/digits.json --output exported/digits_hf
    mmret export CKPT --format sentence-transformers --output exported/digits_st

A dual encoder goes out in open_clip's hub layout by default (`open_clip_config.json` +
`open_clip_model.safetensors`, `mmret.models.export`); `--format transformers` writes a transformers
CLIPModel / SiglipModel with its processor, `--format sentence-transformers` the same as a SentenceTransformer
(`mmret.models.hf_export`; towers without a transformers counterpart are refused in one line). Every export
carries a model card, README.md in the Hub's format (`mmret.models.model_card`): the checkpoint's
hyperparameters, the run's config.yaml and git commit, and the metrics of the `--results` files of `mmret eval`.
A reranker goes out as `reranker_config.json` + `reranker_model.safetensors`
(`mmret.training.checkpoint_io.export_cross_encoder`), with the default format only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmret.errors import UsageError

FORMATS = ("open_clip", "transformers", "sentence-transformers")
# Why a reranker has no transformers / sentence-transformers export (one line, for the refusal).
_RERANKER_FORMATS = (
    "a reranker (cross-encoder) checkpoint exports only with --format open_clip (reranker_config.json + "
    "reranker_model.safetensors): its open_clip towers and fusion layers have no transformers model class, "
    "and a sentence-transformers CrossEncoder scores image-text pairs only through one"
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmret export`."""
    parser.add_argument("checkpoint", help="a .ckpt written by `mmret fit` (dual encoder or reranker)")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="open_clip",
        help="open_clip: open_clip's hub layout; transformers: a CLIPModel / SiglipModel directory with its "
        "processor; sentence-transformers: a SentenceTransformer directory (default: %(default)s)",
    )
    parser.add_argument(
        "--results",
        action="append",
        default=[],
        metavar="FILE",
        help="a results JSON of `mmret eval` whose metrics go into the model card; repeat for several "
        "(default: none)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument(
        "--hf-model-name",
        default=None,
        help="hub id to record for a Hugging Face text tower (before uploading the export; default: none)",
    )


def run(args: argparse.Namespace) -> int:
    """Run `mmret export` with parsed arguments."""
    from mmret.io import check_output_parent
    from mmret.models import export_open_clip
    from mmret.models.model_card import read_results
    from mmret.training import DualEncoder
    from mmret.training.checkpoint_io import checkpoint_kind, export_cross_encoder

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} exists and is not a folder; expected a new or empty folder")
    check_output_parent(output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise UsageError(f"output {output} exists and is not empty; pass --overwrite to replace it")
    if args.hf_model_name and args.format != "open_clip":
        raise UsageError(f"--hf-model-name applies to --format open_clip only, not {args.format}")
    results = [read_results(path) for path in args.results]
    if checkpoint_kind(args.checkpoint) == "cross_encoder":
        if args.format != "open_clip":
            raise UsageError(_RERANKER_FORMATS)
        from mmret.training.checkpoint_io import read_checkpoint

        towers = read_checkpoint(args.checkpoint, "cross_encoder")["mmret"]["model"]
        card = _card_info(args.checkpoint, towers, output, results)
        written = export_cross_encoder(args.checkpoint, output, card=card)
        print(
            f"exported reranker to {written}: reranker_config.json + reranker_model.safetensors + README.md"
        )
        return 0
    module = DualEncoder.from_checkpoint(args.checkpoint)
    card = _card_info(args.checkpoint, module.hparams.model, output, results)
    card.matryoshka_dims = [dim for dim, _ in module.matryoshka]  # [] unless trained with matryoshka_dims
    if args.format == "open_clip":
        written = export_open_clip(
            module.model, None, output, overwrite=args.overwrite, hf_model_name=args.hf_model_name, card=card
        )
        print(
            f"exported to {written}: load with open_clip.create_model_and_transforms('local-dir:{written}')"
        )
        return 0
    from mmret.models.hf_export import export_sentence_transformers, export_transformers

    if args.format == "transformers":
        written = export_transformers(module.model, output, overwrite=args.overwrite, card=card)
        print(f"exported to {written}: load with transformers.AutoModel.from_pretrained('{written}')")
    else:
        written = export_sentence_transformers(module.model, output, overwrite=args.overwrite, card=card)
        print(f"exported to {written}: load with sentence_transformers.SentenceTransformer('{written}')")
    return 0


def _card_info(checkpoint: str, architecture: str, output: Path, results: list[dict]):
    """What the model card says: the checkpoint's and its run's record, the results, the exporting commit."""
    from mmret.models.model_card import CardInfo
    from mmret.training.provenance import git_commit, run_record

    record = run_record(checkpoint)
    return CardInfo(
        model_name=output.resolve().name,
        architecture=architecture,
        checkpoint=str(checkpoint),
        hyper_parameters=record["hyper_parameters"],
        data_hyper_parameters=record["data_hyper_parameters"],
        run_config=record["run_config"],
        trained_commit=record["git_commit"],
        exported_commit=git_commit(),
        datasets=record["datasets"],
        results=results,
    )
