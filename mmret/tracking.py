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

`read_offline_run(path)` decodes an offline run's transaction log (`run-ID.wandb`) with wandb's own protobuf
record definitions, for tests and for checking what a run logged without uploading it.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
import string
import struct
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"id": run_id}) + "\n")
    tmp.replace(path)
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

    from mmret.training_cli import git_commit

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


def log_results_summary(run_dir: str | Path, results: dict, project: str) -> None:
    """Sets a finished evaluation's metrics (a Results JSON) as the summary of the run directory's W&B run."""
    import wandb

    os.environ.setdefault("WANDB_MODE", wandb_mode())
    run = wandb.init(project=project, id=run_id_for(run_dir), resume="allow", dir=str(run_dir))
    for key in ("metrics", "reranked_metrics"):
        for metric, value in (results.get(key) or {}).items():
            run.summary[f"{'test' if key == 'metrics' else 'test_reranked'}/{metric}"] = value
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


def read_offline_run(path: str | Path) -> OfflineRun:
    """Decodes `run-ID.wandb` (or the offline-run directory holding it) with wandb's protobuf `Record`."""
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
    if run is None:
        raise ValueError(f"{path} holds no run record")
    run.config = config
    return run
