"""Resolve what a user writes for `train` / `val` / `test` into ordered lists of tar shards with known sizes.

A *source* spec is one of
    /data/cc3m/train                      a shard directory (ours, with dataset.json, or img2dataset output)
    /data/cc3m/{00000..00009}.tar         a brace pattern (webdataset / img2dataset convention)
    /data/cc3m/000*.tar                   a glob
    /data/cc3m/00000.tar                  one shard

Sizes (samples per shard) come from `DIR/dataset.json` (`shards` + `shard_sizes`) or from img2dataset's
per-shard `NNNNN_stats.json` (`successes`); they give the default samples per epoch, the totals of evaluation
progress, and weight how often each shard is drawn during training. Shards with neither (e.g. written by plain
`webdataset.TarWriter`) are counted once from their tar headers (`mmret.data.samples.count_shard_samples`:
samples with an image, grouped as the reader groups them), and the counts are cached beside them in
`.mmret_counts.json` (shard file name -> bytes, mtime, samples; a shard whose size or mtime changed is counted
again). A folder that cannot be written keeps no cache: its shards are counted on every run, and the line that
reports the count says so. Only local paths are supported.

    from mmret.data.shard_sets import resolve_sources
    sources = resolve_sources(["/data/a", "/data/b/{00000..00003}.tar"], role="train")
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from mmret.data.samples import count_shard_samples
from mmret.distributed import get_rank
from mmret.errors import UsageError
from mmret.io import write_json_atomic
from mmret.progress import Progress

SPEC_HELP = "a shard directory, a .tar file, a glob, or a brace pattern like /x/{00000..00009}.tar"
# Beside shards without dataset.json / *_stats.json: their sample counts, so they are scanned once.
COUNTS_FILE = ".mmret_counts.json"


@dataclass(frozen=True)
class ShardSource:
    """One data source: tar shards in a fixed order and what is known about them.

    Args:
        spec: What the user wrote (used in messages).
        shards: Absolute shard paths, in reading order.
        shard_sizes: Samples per shard, `None` where unknown.
        info: The content of the source's `dataset.json` when it has one.
    """

    spec: str
    shards: tuple[str, ...]
    shard_sizes: tuple[int | None, ...]
    info: dict | None = None

    @property
    def num_samples(self) -> int | None:
        """Total samples when every shard's size is known, else None."""
        if any(size is None for size in self.shard_sizes):
            return None
        return sum(self.shard_sizes)


def _read_json(path: Path, role: str) -> dict:
    try:
        with open(path) as handle:
            content = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{role} data: cannot read {path} ({err}); expected a JSON object") from None
    if not isinstance(content, dict):
        raise UsageError(f"{role} data: {path} holds {type(content).__name__}; expected a JSON object")
    return content


def _sizes_from_info(info: dict | None) -> dict[str, int]:
    """Shard basename -> sample count, from a dataset.json."""
    if not info or not isinstance(info.get("shards"), list) or not isinstance(info.get("shard_sizes"), list):
        return {}
    return {os.path.basename(name): int(size) for name, size in zip(info["shards"], info["shard_sizes"])}


def _size_from_stats(shard: str) -> int | None:
    """img2dataset writes `00000_stats.json` beside `00000.tar`; its `successes` is the sample count."""
    stats_path = shard[: -len(".tar")] + "_stats.json" if shard.endswith(".tar") else None
    if stats_path is None or not os.path.isfile(stats_path):
        return None
    try:
        with open(stats_path) as handle:
            successes = json.load(handle).get("successes")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return int(successes) if isinstance(successes, int) else None


def _dataset_info_near(shards: Sequence[str], role: str) -> dict | None:
    """The dataset.json of the directory holding the shards, when they all live in one directory."""
    parents = {os.path.dirname(shard) for shard in shards}
    if len(parents) != 1:
        return None
    info_path = Path(parents.pop()) / "dataset.json"
    return _read_json(info_path, role) if info_path.is_file() else None


def _shards_of_directory(directory: Path, role: str) -> tuple[list[str], dict | None]:
    info_path = directory / "dataset.json"
    if info_path.is_file():
        info = _read_json(info_path, role)
        names = info.get("shards")
        if not isinstance(names, list) or not names:
            raise UsageError(f"{role} data: {info_path} has no 'shards' list; expected the shard file names")
        shards = [str((directory / name).resolve()) for name in names]
        missing = [shard for shard in shards if not os.path.isfile(shard)]
        if missing:
            raise UsageError(f"{role} data: {info_path} lists {missing[0]}, which does not exist")
        return shards, info
    shards = sorted(str(path.resolve()) for path in directory.glob("*.tar"))
    if not shards:
        raise UsageError(f"{role} data: directory {directory} has no *.tar shards and no dataset.json")
    return shards, None


def _shards_of_pattern(spec: str, role: str) -> list[str]:
    if any(char in spec for char in "*?["):
        shards = sorted(glob.glob(spec))
        if not shards:
            raise UsageError(f"{role} data: glob {spec!r} matches no file; expected {SPEC_HELP}")
        return [str(Path(shard).resolve()) for shard in shards]
    shards = list(braceexpand.braceexpand(spec))
    missing = [shard for shard in shards if not os.path.isfile(shard)]
    if missing:
        raise UsageError(f"{role} data: {missing[0]!r} (from {spec!r}) does not exist; expected {SPEC_HELP}")
    return [str(Path(shard).resolve()) for shard in shards]


def _shard_state(shard: str) -> dict[str, int]:
    """What tells a changed shard: its size and modification time."""
    stat = os.stat(shard)
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_counts(directory: Path) -> dict[str, dict]:
    """The cached counts of a folder's shards (empty when there is no cache or it is unreadable)."""
    try:
        with open(directory / COUNTS_FILE) as handle:
            shards = json.load(handle).get("shards")
    except (OSError, ValueError, AttributeError):
        return {}
    return shards if isinstance(shards, dict) else {}


def _cached_count(entry: object, state: dict[str, int]) -> int | None:
    if not isinstance(entry, dict) or any(entry.get(key) != value for key, value in state.items()):
        return None
    samples = entry.get("samples")
    return samples if isinstance(samples, int) and not isinstance(samples, bool) and samples >= 0 else None


def _write_counts(directory: Path, counts: dict[str, dict]) -> str:
    """Cache the counts beside the shards; returns how that went, for the line that reports the count."""
    path = directory / COUNTS_FILE
    # How the counts get cached all the same: the same resolution, run by someone who can write the folder.
    how = f'python -c "from mmret.data.shard_sets import resolve_source; resolve_source({str(directory)!r})"'
    again = f"they are counted again on every run unless someone who can write there runs {how}"
    if not os.access(directory, os.W_OK):
        return f"not cached: {directory} is not writable; {again}"
    content = {
        "about": "samples per tar shard of this folder, counted by mmret (bytes and mtime_ns tell a changed "
        "shard, which is counted again); safe to delete",
        "shards": {name: counts[name] for name in sorted(counts) if (directory / name).is_file()},
    }
    try:
        write_json_atomic(path, content)
    except (UsageError, OSError) as err:
        reason = str(err).split("; ")[0]  # without the remedy, which names another command's option
        return f"not cached: {reason}; {again}"
    return f"cached in {path}"


def count_unknown_sizes(shards: Sequence[str], sizes: Sequence[int | None]) -> tuple[int | None, ...]:
    """Fill in the sizes that neither dataset.json nor *_stats.json gave: from each folder's count cache, or by
    counting the shard's samples (then cached). Prints one line per folder where shards were counted (rank 0).

    A shard that cannot be opened stays None (unknown): reading it would fail the same way, and say so.
    """
    sizes = list(sizes)
    unknown: dict[str, list[int]] = {}
    for index, (shard, size) in enumerate(zip(shards, sizes)):
        if size is None:
            unknown.setdefault(os.path.dirname(shard), []).append(index)
    for parent, indices in unknown.items():
        directory = Path(parent)
        cache = _read_counts(directory)
        todo = []
        for index in indices:
            name = os.path.basename(shards[index])
            try:
                state = _shard_state(shards[index])
            except OSError:
                continue
            cached = _cached_count(cache.get(name), state)
            if cached is None:
                todo.append((index, name, state))
            else:
                sizes[index] = cached
        if not todo:
            continue
        counted, total = 0, 0
        with Progress(f"counting the samples of {directory}", total=len(todo), unit="shards") as bar:
            for index, name, state in todo:
                try:
                    sizes[index] = count_shard_samples(shards[index])
                except OSError:
                    continue
                cache[name] = {**state, "samples": sizes[index]}
                counted, total = counted + 1, total + sizes[index]
                bar.update()
        if not counted:
            continue
        cached = _write_counts(directory, cache)
        if get_rank() == 0:
            shard_word = "shard" if counted == 1 else "shards"
            print(
                f"counted {total:,} samples in {counted} {shard_word} of {directory} ({cached})", flush=True
            )
    return tuple(sizes)


def resolve_source(spec: str | os.PathLike, role: str = "data") -> ShardSource:
    """Turn one spec into a ShardSource.

    Args:
        spec: A shard directory, a .tar file, a glob or a brace pattern.
        role: "train", "val" or "test": named in error messages.

    Raises:
        UsageError: the spec names nothing readable.
    """
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if "://" in spec or spec.startswith("pipe:"):
        raise UsageError(
            f"{role} data: {spec!r} is remote; only local shards are supported, expected {SPEC_HELP}"
        )
    if path.is_dir():
        shards, info = _shards_of_directory(path, role)
    elif path.is_file():
        if not tarfile.is_tarfile(path):
            raise UsageError(f"{role} data: {spec!r} is not a tar archive; expected {SPEC_HELP}")
        shards, info = [str(path.resolve())], None
    elif "{" in spec or any(char in spec for char in "*?["):
        shards, info = _shards_of_pattern(str(path), role), None
    else:
        raise UsageError(f"{role} data: {spec!r} does not exist; expected {SPEC_HELP}")
    if info is None:
        info = _dataset_info_near(shards, role)
    sizes_by_name = _sizes_from_info(info)
    sizes = [sizes_by_name.get(os.path.basename(shard), _size_from_stats(shard)) for shard in shards]
    sizes = count_unknown_sizes(shards, sizes)
    return ShardSource(spec=spec, shards=tuple(shards), shard_sizes=sizes, info=info)


def resolve_sources(
    specs: str | os.PathLike | Sequence[str | os.PathLike] | None, role: str
) -> list[ShardSource]:
    """Resolve a spec or a list of specs (each one source); None gives an empty list."""
    if specs is None:
        return []
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    return [resolve_source(spec, role) for spec in specs]


def total_samples(sources: Sequence[ShardSource]) -> int | None:
    """Samples summed over sources, None when any shard's size is unknown."""
    counts = [source.num_samples for source in sources]
    return None if any(count is None for count in counts) else sum(counts)
