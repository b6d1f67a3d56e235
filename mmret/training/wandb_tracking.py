"""Weights & Biases tracking of mmret runs: the logger, its run id across restarts, and reading runs back.

`mmret fit ... --wandb_project mmret` (or `wandb_project: mmret` in the experiment YAML) adds a `WandbLogger`
beside the CSV logger. It writes under `RUN_DIR/wandb/` and:

- runs offline unless the user has logged in (an API key in `WANDB_API_KEY` or ~/.netrc); `WANDB_MODE` set by
  the user always wins. Offline runs upload later with `wandb sync RUN_DIR/wandb/offline-run-*`.
- logs the resolved LightningCLI config (`experiment`), the git commit and SLURM job (id, array task, restart
  count) (`mmret`), the training data's `dataset.json` (`dataset_info`) and the model's hyperparameters (flat,
  by Lightning) as the run's config; `--wandb_group` (a sweep's name) and `--wandb_tags` (its
  varied values) group and tag it.
- keeps one W&B run per run directory: the id is stored in `RUN_DIR/wandb_run.json` on the first start, and a
  resumed or requeued run continues it (`resume="allow"`).
- at every validation, logs a table of retrieval examples (`val/examples`: text queries, the images ranked
  first for them, whether each is correct; `ValidationExamplesToWandb`).

`mmret eval --model RUN_DIR/checkpoints/last.ckpt ... --wandb-summary` (what slurm/train.sbatch runs at the end
of a W&B-tracked job) sets the results JSON as that run's summary (`log_results_summary`).

`read_offline_run(path)` decodes an offline run's transaction log (`run-ID.wandb`) with wandb's own protobuf
record definitions, for tests and for checking what a run logged without uploading it; `logged_table` reads a
table (with its images) back from it.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
import string
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from mmret.io import write_text_atomic

RUN_ID_FILE = "wandb_run.json"


def wandb_mode() -> str:
    """`WANDB_MODE` when the user set it, else "online" with credentials and "offline" without."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return "offline"
    return "online" if any("wandb" in host for host in hosts) else "offline"


def _is_global_zero() -> bool:
    # Before the Trainer exists: srun sets SLURM_PROCID, torchrun / Lightning's launcher RANK and LOCAL_RANK.
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))


def run_id_for(run_dir: str | Path) -> str | None:
    """The W&B run id of this run directory, created (on global rank 0 only) on the first start."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file():
        return json.loads(path.read_text())["id"]
    if not _is_global_zero():
        return None  # the other ranks never create a W&B run
    run_id = "".join(
        secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)
    )  # W&B's id style
    write_text_atomic(path, json.dumps({"id": run_id}) + "\n")
    return run_id


def build_wandb_logger(
    run_dir: str | Path,
    project: str,
    config: dict,
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
):
    """A `WandbLogger` for the run directory, continuing its W&B run when it has one.

    Args:
        run_dir: the mmret run directory; W&B files go to `run_dir/wandb/`.
        project: W&B project.
        config: the resolved experiment config (the run's W&B config, with `mmret/...` run facts added).
        name: display name (default: the run directory's name).
        group: W&B group, e.g. the sweep's name.
        tags: W&B tags, e.g. `lr=0.001` for the varied values of a sweep point.
    """
    from lightning.pytorch.loggers import WandbLogger

    from mmret.training.provenance import git_commit

    os.environ.setdefault("WANDB_MODE", wandb_mode())
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    facts = {
        "git_commit": git_commit(),
        "run_dir": str(run_dir.resolve()),
        "slurm_job_id": os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
    }
    return WandbLogger(
        project=project,
        name=name or run_dir.name,
        group=group,
        tags=list(tags or []),
        id=run_id_for(run_dir),
        resume="allow",
        save_dir=str(run_dir),
        config={"experiment": config, "mmret": facts},
        allow_val_change=True,
    )


class DatasetInfoToWandb(Callback):
    """Adds the training data's `dataset.json` to the W&B config once the data is set up (rank 0)."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning.pytorch.loggers import WandbLogger

        datamodule = trainer.datamodule
        if not trainer.is_global_zero or datamodule is None or not hasattr(datamodule, "dataset_info"):
            return
        info = datamodule.dataset_info("train")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and info is not None:
                logger.experiment.config.update({"dataset_info": info}, allow_val_change=True)


class ValidationExamplesToWandb(Callback):
    """Logs what the dual encoder retrieves at each validation as a W&B table (`val/examples`) with images.

    One row per text query: the first `num_queries` val captions in caption-hash order (the queries of
    `mmret eval`'s examples picture: fixed for a data set, so the rows compare across steps), the `top_k`
    images the model ranks first for it over the whole val set (`wandb.Image`, captioned with rank, cosine
    score and ✓ when the caption was written for that image), their sample ids, whether each is correct, and
    how many correct images the top `top_k` holds. The ranking is that of the validation metrics: the module's
    gathered `last_val_eval_set`. Images are read back from the val shards by key on rank 0; every rank sends
    it the keys and captions of the batches it saw (a collective, run on every rank).

    Args:
        num_queries: rows per table.
        top_k: images per row.
    """

    def __init__(self, num_queries: int = 8, top_k: int = 5) -> None:
        self.num_queries = num_queries
        self.top_k = top_k
        self._keys: dict[int, str] = {}
        self._captions: dict[int, str] = {}

    @staticmethod
    def _wandb_loggers(trainer: Trainer) -> list:
        from lightning.pytorch.loggers import WandbLogger

        return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._keys, self._captions = {}, {}

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs,
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        from mmret.evaluation.retrieval import caption_hash

        if not self._wandb_loggers(trainer) or "key" not in batch:
            return
        for sample_id, key, captions in zip(batch["sample_id"].tolist(), batch["key"], batch["captions"]):
            self._keys[int(sample_id)] = key
            self._captions.update((caption_hash(caption), caption) for caption in captions)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loggers = self._wandb_loggers(trainer)
        eval_set = getattr(pl_module, "last_val_eval_set", None)
        if not loggers or eval_set is None or trainer.sanity_checking:
            return
        keys: dict[int, str] = {}
        captions: dict[int, str] = {}
        for rank in range(trainer.world_size):  # collective: rank by rank, its keys and captions to everyone
            rank_keys, rank_captions = trainer.strategy.broadcast((self._keys, self._captions), src=rank)
            keys.update(rank_keys)
            captions.update(rank_captions)
        self._keys, self._captions = {}, {}
        if not trainer.is_global_zero or eval_set.num_images == 0:
            return
        query_captions = eval_set.captions
        if query_captions is None:  # an eval set without its strings: the batches' captions, in its order
            if len(captions) != eval_set.num_texts:
                print(
                    f"mmret: val/examples not logged: {len(captions)} captions seen, {eval_set.num_texts} "
                    "queries in the validation set",
                    file=sys.stderr,
                )
                return
            query_captions = [captions[h] for h in sorted(captions)]  # caption-hash order, as the queries
        datamodule = trainer.datamodule
        sources = datamodule.sources("val") if hasattr(datamodule, "sources") else []  # none: blank images
        columns, rows = self.table(eval_set, query_captions, keys, sources)
        rows = [[trainer.global_step, *row] for row in rows]
        for logger in loggers:
            logger.log_table("val/examples", columns=["step", *columns], data=rows, step=trainer.global_step)

    def table(self, eval_set, query_captions: list[str], keys: dict[int, str], sources) -> tuple[list, list]:
        """The table's columns (without `step`) and rows for the first queries of an `EmbeddedEvalSet`."""
        import wandb
        from PIL import Image

        from mmret.evaluation.retrieval import top_k_candidates
        from mmret.evaluation.shard_set import read_images

        queries = list(range(min(self.num_queries, eval_set.num_texts)))
        top = top_k_candidates(eval_set.text_emb[queries], eval_set.image_emb, self.top_k)  # [Q, k]
        image_ids = eval_set.image_ids.tolist()
        wanted = {image_ids[index] for index in top.indices.flatten().tolist()}
        images = read_images(sources, {image_id: keys[image_id] for image_id in wanted if image_id in keys})
        k = top.indices.shape[1]
        columns = ["query", "top1_correct", "correct_in_top_k", *[f"top{r}" for r in range(1, k + 1)]]
        columns += ["top_ids", "correct"]
        rows = []
        for row, query in enumerate(queries):
            ranked = [image_ids[index] for index in top.indices[row].tolist()]
            correct = [image_id in eval_set.text_relevant[query] for image_id in ranked]
            cells = [
                wandb.Image(
                    images.get(image_id) or Image.new("RGB", (8, 8), "white"),
                    caption=f"#{rank + 1} {score:.3f}{' ✓' if ok else ''}",
                )
                for rank, (image_id, score, ok) in enumerate(zip(ranked, top.scores[row].tolist(), correct))
            ]
            rows.append([
                query_captions[query], correct[0], sum(correct), *cells,
                " ".join(str(image_id) for image_id in ranked), "".join("✓" if ok else "✗" for ok in correct),
            ])  # fmt: skip
        return columns, rows


def run_dir_of_checkpoint(checkpoint: str | Path) -> Path:
    """The run directory of a checkpoint written by `mmret fit` (RUN_DIR/checkpoints/NAME.ckpt)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def check_results_summary_target(checkpoint: str | Path) -> Path:
    """The run directory whose W&B run `log_results_summary` would update; UsageError when it has none."""
    from mmret.errors import UsageError

    run_dir = run_dir_of_checkpoint(checkpoint)
    if not (run_dir / RUN_ID_FILE).is_file():
        raise UsageError(
            f"--wandb-summary: {run_dir} has no {RUN_ID_FILE}; expected the checkpoint of a run trained with "
            "`mmret fit --wandb_project P` (RUN_DIR/checkpoints/*.ckpt)"
        )
    return run_dir


def log_results_summary(run_dir: str | Path, results: dict, project: str | None = None) -> str:
    """Sets a finished evaluation (a Results JSON) as the summary of the run directory's W&B run.

    The summary gets `SPLIT/METRIC` for every metric (`test/image_retrieval_recall@1`, ...), `SPLIT/reranked/
    METRIC` for reranked ones, and the whole document under `results`. The project is the run's
    `wandb_project` (from RUN_DIR/config.yaml) unless given. Returns the W&B run id.
    """
    import wandb
    import yaml

    run_dir = Path(run_dir)
    if project is None:
        config = (
            yaml.safe_load((run_dir / "config.yaml").read_text())
            if (run_dir / "config.yaml").is_file()
            else {}
        )
        project = (config or {}).get("wandb_project") or "mmret"
    os.environ.setdefault("WANDB_MODE", wandb_mode())
    split = ((results.get("config") or {}).get("eval") or {}).get("split") or "eval"
    run = wandb.init(
        project=project,
        id=run_id_for(run_dir),
        resume="allow",
        dir=str(run_dir),
        settings=wandb.Settings(console="off", silent=True),
    )
    try:
        for metric, value in (results.get("metrics") or {}).items():
            run.summary[f"{split}/{metric}"] = value
        for metric, value in (results.get("reranked_metrics") or {}).items():
            run.summary[f"{split}/reranked/{metric}"] = value
        run.summary["results"] = json.loads(json.dumps(results, default=str))
        return run.id
    finally:
        run.finish()


# ---------------------------------------------------------------------------------------------- reading runs back


@dataclass
class OfflineRun:
    """What an offline run's transaction log holds."""

    run_id: str
    project: str
    group: str
    tags: list[str]
    config: dict
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    # client id -> {path in the artifact: local file} of every artifact the run logged (W&B logs a table
    # with images as a run artifact whose files stay in its staging directory until `wandb sync`)
    artifacts: dict[str, dict[str, str]] = field(default_factory=dict)
    # the run's exit code once its exit record is written (W&B writes the log asynchronously: a run whose
    # process just ended may not have it yet)
    exit_code: int | None = None


_BLOCK = 32768
_HEADER = 7  # crc32c (4) + length (2) + record type (1), as in LevelDB's log format


def _log_payloads(data: bytes):
    """Payloads of a LevelDB-format log (what wandb's transaction log is), after wandb's 7-byte file header."""
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    pos, pending = 7, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk
            pending = b""


def read_offline_run(path: str | Path, timeout: float = 0.0) -> OfflineRun:
    """Decodes `run-ID.wandb` (or the offline-run directory holding it) with wandb's protobuf `Record`.

    Args:
        path: the transaction log or its offline-run directory.
        timeout: wait up to this many seconds for the log to be complete (its exit record written; W&B's
            service writes it asynchronously, after the run's process may have ended).
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            run = _read_offline_run(Path(path))
        except (ValueError, StopIteration, DecodeError):  # no log yet, no run record yet, a record cut short
            if time.monotonic() >= deadline:
                raise
            run = None
        if run is not None and (run.exit_code is not None or time.monotonic() >= deadline):
            return run
        time.sleep(0.2)


def _read_offline_run(path: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    if path.is_dir():
        path = next(path.glob("run-*.wandb"))
    run = None
    config: dict = {}
    for payload in _log_payloads(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = OfflineRun(
                record.run.run_id, record.run.project, record.run.run_group, list(record.run.tags), {}
            )
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            if run is not None:
                run.history.append(history)
        elif kind == "summary" and run is not None:
            for item in record.summary.update:
                run.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "exit" and run is not None:
            run.exit_code = record.exit.exit_code
        elif kind == "artifact" and run is not None:
            files = {entry.path: entry.local_path for entry in record.artifact.manifest.contents}
            run.artifacts[record.artifact.client_id] = files
    if run is None:
        raise ValueError(f"{path} holds no run record")
    run.config = config
    return run


def logged_table(run: OfflineRun, row: dict, key: str) -> tuple[list[str], list[list]]:
    """The columns and rows of the table logged under `key` in a history `row` of an offline run.

    Image cells are W&B's image references with `local_path` added: the PNG file the run wrote.
    """
    reference = row[f"{key}/artifact_path"]  # wandb-client-artifact://CLIENT_ID/PATH
    client_id, _, path = reference.removeprefix("wandb-client-artifact://").partition("/")
    files = run.artifacts[client_id]
    table = json.loads(Path(files[path]).read_text())

    def cell(value):
        if isinstance(value, dict) and value.get("_type") == "image-file":
            return {**value, "local_path": files[value["path"]]}
        return value

    return table["columns"], [[cell(value) for value in data_row] for data_row in table["data"]]
