"""Readers for the raw image–caption sources that `mmret shards` converts.

Three kinds of source, told apart by what SRC is:

- a **folder** of images (jpg/jpeg/png/webp/bmp, searched recursively, hidden folders ignored), each with a
  same-stem `.txt` sidecar holding its captions, one per line;
- a **table**: `.csv`, `.tsv` or `.jsonl` with an image-path column (relative to the table's folder, or
  absolute) and a caption column (several captions per cell separated by newlines; in JSONL also a list).
  Columns not named by the caller are recognised by the common conventions (`table_columns`: open_clip's
  `filepath`/`title`, img2dataset's `url`/`caption`, `image`/`text`, `file_name`/`text`, ...); a table whose
  image column holds only URLs is refused (nothing is downloaded). Rows naming the same image merge their
  captions; a label column, only when named, becomes the sample's `.cls`;
- an **img2dataset output** (or an earlier `mmret shards` output): a folder with `*.tar` shards of
  `KEY.jpg`/`KEY.txt`/optional `KEY.json`/`KEY.cls`, with or without `*_stats.json` and `dataset.json`.

`open_source` checks everything it can before a single byte is written (the path, its kind, the columns)
and raises `UsageError` otherwise; per-sample problems found later (a missing image, an empty caption) do
not stop the run: the sample carries a `skip_reason` and the writer counts it.

    source = open_source("pairs.csv")                 # columns recognised, or named: image_column="file"
    print(source.columns.describe())                  # columns: image from 'filepath', caption from 'title' ...
    for sample in source.samples(): ...
"""

from __future__ import annotations

import csv
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmret.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TABLE_EXTENSIONS = {".csv": ",", ".tsv": "\t", ".jsonl": None}
# Image members of a webdataset sample, in the order of preference when a sample has several.
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")

# Skip reasons, as counted in dataset.json "skipped" and listed in skipped.txt.
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
UNDECODABLE_IMAGE = "undecodable_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
INVALID_LABEL = "invalid_label"
CONFLICTING_LABELS = "conflicting_labels"
URL_NOT_SUPPORTED = "url_not_supported"
UNREADABLE_TAR = "unreadable_tar"

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

# Column names of the common image-caption table conventions, matched case-insensitively: open_clip's CSV
# (filepath, title), img2dataset's input (url, caption), Hugging Face imagefolder metadata (file_name, text),
# and image/caption (mmret's own), image/text, image_path/caption, file/text, path/caption, img/txt.
IMAGE_COLUMN_NAMES = ("image", "filepath", "image_path", "file_name", "file", "path", "img", "url")
CAPTION_COLUMN_NAMES = ("caption", "title", "text", "captions", "txt")


@dataclass
class SourceSample:
    """One image with all its captions, before decoding.

    Attributes:
        image: a file path, encoded image bytes, or an already decoded PIL image / `[H, W, 3]` uint8 array;
            None when the sample is skipped before decoding.
        captions: the image's captions (all positives), cleaned: stripped, non-empty, unique.
        source: where the sample came from, for skipped.txt (a path, `table.csv line 7`, `00003.tar:KEY`).
        label: integer class label written as `.cls`, or None.
        metadata: extra JSON fields; "id" and "captions" are set by the writer (a caller-supplied int "id"
            is kept).
        skip_reason: set when the source already knows the sample is unusable.
    """

    image: str | Path | bytes | Image.Image | np.ndarray | None
    captions: list[str]
    source: str
    label: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None


@dataclass
class Source:
    """An opened, validated source: its kind, a sample count when known, and a fresh-iterator factory."""

    kind: str
    path: Path
    samples: Callable[[], Iterator[SourceSample]]
    num_samples: int | None
    class_names: list[str] | None = None
    columns: TableColumns | None = None


def clean_captions(values: Any) -> list[str]:
    """Split caption text (or a list of texts) into stripped, non-empty, de-duplicated lines, in order."""
    if values is None:
        return []
    if not isinstance(values, (list, tuple)):
        values = [values]
    captions: list[str] = []
    for value in values:
        if value is None:
            continue
        for line in str(value).splitlines():
            line = " ".join(line.split())
            if line and line not in captions:
                captions.append(line)
    return captions


def open_source(
    src: str | Path,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
) -> Source:
    """Validate SRC and return a reader for it.

    Args:
        src: a folder of images with `.txt` sidecars, a `.csv`/`.tsv`/`.jsonl` table, or a folder of
            img2dataset-style `*.tar` shards.
        image_column: table column with the image path (default: recognised by name, see `table_columns`);
            tables only.
        caption_column: table column with the caption(s) (default: recognised by name); tables only.
        label_column: optional table column with an integer class label (never guessed); tables only.

    Raises:
        UsageError: SRC is missing, unreadable, of an unsupported kind, holds no images, lacks a column, has
            no recognisable (or several) image or caption columns, or its image column holds only URLs.
    """
    path = Path(src).expanduser()
    expected = (
        "expected a folder of images with .txt captions, a .csv/.tsv/.jsonl file, or an img2dataset folder"
    )
    if not path.exists():
        raise UsageError(f"source {str(src)!r} does not exist; {expected}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in TABLE_EXTENSIONS:
            raise UsageError(
                f"source {str(src)!r} is a {suffix or 'extension-less'} file, not a supported kind; {expected}"
            )
        if not os.access(path, os.R_OK):
            raise UsageError(f"source {str(src)!r} is not readable (permission denied)")
        return _open_table(path, image_column, caption_column, label_column, TABLE_EXTENSIONS[suffix])
    if not path.is_dir():
        raise UsageError(f"source {str(src)!r} is neither a regular file nor a folder; {expected}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"source folder {str(src)!r} is not readable (permission denied)")
    given = [
        flag
        for flag, value in (
            ("--image-column", image_column),
            ("--caption-column", caption_column),
            ("--label-column", label_column),
        )
        if value is not None
    ]
    if given:
        raise UsageError(
            f"{', '.join(given)} applies only to .csv/.tsv/.jsonl sources, but {str(src)!r} is a folder"
        )
    tars = sorted(p for p in path.glob("*.tar") if p.is_file())
    if tars:
        return _open_tar_folder(path, tars)
    return _open_image_folder(path, expected)


# -- folder of images with .txt sidecars ---------------------------------------------------------------


def _open_image_folder(root: Path, expected: str) -> Source:
    images = sorted(
        (
            p
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not images:
        raise UsageError(
            f"source folder {str(root)!r} holds no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) and no "
            f".tar shards; {expected}"
        )

    def samples() -> Iterator[SourceSample]:
        for image_path in images:
            relative = image_path.relative_to(root).as_posix()
            sidecar = image_path.with_suffix(".txt")
            if not sidecar.is_file():
                yield SourceSample(None, [], relative, skip_reason=MISSING_CAPTION)
                continue
            captions = clean_captions(sidecar.read_text(encoding="utf-8", errors="replace"))
            yield SourceSample(
                image_path,
                captions,
                relative,
                metadata={"image_path": relative},
                skip_reason=None if captions else EMPTY_CAPTION,
            )

    return Source("folder", root, samples, len(images))


# -- CSV / TSV / JSONL tables --------------------------------------------------------------------------


@dataclass(frozen=True)
class TableColumns:
    """The columns a table is read by.

    Attributes:
        image: the image-path column.
        caption: the caption column.
        label: the label column, only when the caller named one.
        detected: the roles ("image", "caption") recognised by name rather than given.
        unused_label: a column called `label` that is not read, because no label column was named.
    """

    image: str
    caption: str
    label: str | None = None
    detected: tuple[str, ...] = ()
    unused_label: str | None = None

    def describe(self) -> str | None:
        """The one line that says which columns were recognised, or None when the caller named them all."""
        if not self.detected:
            return None
        chosen = [f"image from {self.image!r}", f"caption from {self.caption!r}"]
        if self.label is not None:
            chosen.append(f"label from {self.label!r}")
        # a bare "auto-detected" only when it holds for every column shown
        every = len(self.detected) == 2 and self.label is None
        which = "auto-detected" if every else f"{' and '.join(self.detected)} auto-detected"
        flags = "/".join(f"--{role}-column" for role in self.detected)
        line = f"columns: {', '.join(chosen)} ({which}; set {flags} to choose)"
        if self.unused_label is not None:
            line += f"; column {self.unused_label!r} is not read as labels without --label-column"
        return line


def _named_like(columns: list[str], names: tuple[str, ...]) -> list[str]:
    return [column for column in columns if column.strip().lower() in names]


def resolve_table_columns(
    columns: list[str],
    where: str,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
) -> TableColumns:
    """The columns to read a table by: those given, the others recognised among `columns` by name.

    A role is recognised when exactly one column carries one of its conventional names (IMAGE_COLUMN_NAMES,
    CAPTION_COLUMN_NAMES); a `url` column gives way to a local-path column beside it. A label column is read
    only when named: labels become `.cls` class ids, which a guess should not invent.

    Args:
        columns: the table's column names, in order.
        where: the table, as named in messages.

    Raises:
        UsageError: a named column is missing, or a role has no recognisable column or several.
    """
    for flag, column in (
        ("--image-column", image_column),
        ("--caption-column", caption_column),
        ("--label-column", label_column),
    ):
        if column is not None and column not in columns:
            raise UsageError(
                f"column {column!r} ({flag}) not found in {where!r}; columns found: "
                f"{', '.join(map(repr, columns)) or 'none'}"
            )
    chosen = {"image": image_column, "caption": caption_column}
    detected, problems = [], []
    for role, names in (("image", IMAGE_COLUMN_NAMES), ("caption", CAPTION_COLUMN_NAMES)):
        if chosen[role] is not None:
            continue
        found = _named_like(columns, names)
        if len(found) > 1:  # a local-path column beats a URL column (the URLs are then the images' origin)
            found = [column for column in found if column.strip().lower() != "url"] or found
        if len(found) == 1:
            chosen[role] = found[0]
            detected.append(role)
        else:
            problems.append((role, found))
    if problems:
        roles = " and ".join(role for role, _ in problems)
        details = "; ".join(
            f"{role}: {' or '.join(map(repr, found)) if found else 'no column of a usual name'}"
            for role, found in problems
        )
        flags = " ".join(f"--{role}-column COLUMN" for role, _ in problems)
        raise UsageError(
            f"cannot tell the {roles} column{'s' if len(problems) > 1 else ''} of {where!r} ({details}); "
            f"columns found: {', '.join(map(repr, columns)) or 'none'}; name "
            f"{'them' if len(problems) > 1 else 'it'} with {flags}"
        )
    unused = None
    if label_column is None:
        unused = next((column for column in columns if column.strip().lower() == "label"), None)
    return TableColumns(chosen["image"], chosen["caption"], label_column, tuple(detected), unused)


def table_columns(
    src: str | Path,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
) -> TableColumns | None:
    """The columns `open_source` will read a `.csv`/`.tsv`/`.jsonl` SRC by (None for other sources), found
    from the header alone (a JSONL file is read whole: its columns are the keys of all its lines), so a
    command can say which columns it chose before the long conversion starts.

    Raises:
        UsageError: as `resolve_table_columns`, or the table cannot be read.
    """
    path = Path(src).expanduser()
    suffix = path.suffix.lower()
    if suffix not in TABLE_EXTENSIONS or not path.is_file() or not os.access(path, os.R_OK):
        return None  # open_source says what is wrong with it
    delimiter = TABLE_EXTENSIONS[suffix]
    columns = _read_rows(path, delimiter)[0] if delimiter is None else _read_header(path, delimiter)
    return resolve_table_columns(columns, str(src), image_column, caption_column, label_column)


@dataclass
class _TableEntry:
    """The merged rows of one image."""

    image_value: str
    image_path: Path | None
    first_line: int
    captions: list[str] = field(default_factory=list)
    labels: set[int] = field(default_factory=set)
    invalid_label: bool = False
    saw_caption: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _read_rows(path: Path, delimiter: str | None) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """All rows of a table as (line number, {column: value}), and the column names found."""
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if delimiter is None:
                columns: dict[str, None] = {}
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise UsageError(
                            f"line {number} of {str(path)!r} is not valid JSON ({err.msg}); "
                            "expected one JSON object per line"
                        ) from err
                    if not isinstance(row, dict):
                        raise UsageError(
                            f"line {number} of {str(path)!r} is a JSON {type(row).__name__}; "
                            "expected one JSON object per line"
                        )
                    columns.update(dict.fromkeys(row))
                    rows.append((number, row))
                return list(columns), rows
            reader = csv.DictReader(handle, delimiter=delimiter)
            if reader.fieldnames is None:
                raise UsageError(f"table {str(path)!r} is empty; expected a header row naming its columns")
            for row in reader:
                rows.append((reader.line_num, row))
            return [name for name in reader.fieldnames if name is not None], rows
    except UnicodeDecodeError as err:
        raise UsageError(f"table {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except csv.Error as err:
        raise UsageError(f"table {str(path)!r} is not valid {path.suffix[1:].upper()}: {err}") from err


def _read_header(path: Path, delimiter: str) -> list[str]:
    """The column names of a CSV/TSV table (its first row)."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle, delimiter=delimiter), None)
    except UnicodeDecodeError as err:
        raise UsageError(f"table {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except csv.Error as err:
        raise UsageError(f"table {str(path)!r} is not valid {path.suffix[1:].upper()}: {err}") from err
    if header is None:
        raise UsageError(f"table {str(path)!r} is empty; expected a header row naming its columns")
    return header


def _parse_label(value: Any) -> int | None:
    """An integer label >= 0, None for an empty cell; raises ValueError for anything else."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(value)
    number = float(value) if not isinstance(value, int) else value
    if number != int(number) or number < 0:
        raise ValueError(value)
    return int(number)


def _refuse_urls_only(path: Path, image_column: str, rows: list[tuple[int, dict[str, Any]]]) -> None:
    """A table whose image column holds nothing but URLs: nothing here downloads them."""
    values = [str(row.get(image_column) or "").strip() for _, row in rows]
    values = [value for value in values if value]
    if values and all(_URL.match(value) for value in values):
        raise UsageError(
            f"column {image_column!r} of {str(path)!r} holds URLs (e.g. {values[0]!r}), and mmret shards reads "
            "local image files only; download the images first (img2dataset writes a folder that mmret shards "
            "reads), or name a column of local paths with --image-column"
        )


def _open_table(
    path: Path,
    image_column: str | None,
    caption_column: str | None,
    label_column: str | None,
    delimiter: str | None,
) -> Source:
    columns, rows = _read_rows(path, delimiter)
    if not rows:
        raise UsageError(f"table {str(path)!r} has no rows; expected one row per image-caption pair")
    chosen = resolve_table_columns(columns, str(path), image_column, caption_column, label_column)
    image_column, caption_column = chosen.image, chosen.caption
    _refuse_urls_only(path, image_column, rows)
    reserved = {image_column, caption_column, label_column, "id", "captions", "label"}
    entries: dict[str, _TableEntry] = {}
    row_skips: list[SourceSample] = []
    for number, row in rows:
        where = f"{path.name} line {number}"
        image_value = row.get(image_column)
        image_value = "" if image_value is None else str(image_value).strip()
        if not image_value:
            row_skips.append(SourceSample(None, [], where, skip_reason=MISSING_IMAGE))
            continue
        if _URL.match(image_value):
            key, image_path = image_value, None
        else:
            candidate = Path(image_value).expanduser()
            image_path = Path(
                os.path.normpath(candidate if candidate.is_absolute() else path.parent / candidate)
            )
            key = str(image_path)
        entry = entries.get(key)
        if entry is None:
            extra = {
                k: v
                for k, v in row.items()
                if k not in reserved and k is not None and isinstance(v, (str, int, float, bool))
            }
            entry = entries[key] = _TableEntry(image_value, image_path, number, extra=extra)
        if caption_column in row:
            entry.saw_caption = True
            for caption in clean_captions(row[caption_column]):
                if caption not in entry.captions:
                    entry.captions.append(caption)
        if label_column is not None:
            try:
                label = _parse_label(row.get(label_column))
            except (TypeError, ValueError):
                entry.invalid_label = True
            else:
                if label is not None:
                    entry.labels.add(label)

    def samples() -> Iterator[SourceSample]:
        yield from row_skips
        for entry in entries.values():
            where = f"{entry.image_value} ({path.name} line {entry.first_line})"
            reason = None
            if entry.image_path is None:
                reason = URL_NOT_SUPPORTED
            elif not entry.captions:
                reason = EMPTY_CAPTION if entry.saw_caption else MISSING_CAPTION
            elif entry.invalid_label:
                reason = INVALID_LABEL
            elif len(entry.labels) > 1:
                reason = CONFLICTING_LABELS
            label = next(iter(entry.labels)) if len(entry.labels) == 1 else None
            metadata = {**entry.extra, "image_path": entry.image_value}
            if label is not None:
                metadata["label"] = label
            yield SourceSample(entry.image_path, entry.captions, where, label, metadata, reason)

    return Source("table", path, samples, len(row_skips) + len(entries), columns=chosen)


# -- img2dataset-style tar folders ---------------------------------------------------------------------


def _split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _count_from_metadata(root: Path, tars: list[Path]) -> tuple[int | None, list[str] | None]:
    """Sample count from dataset.json or img2dataset's *_stats.json (when every shard has one)."""
    info_path = root / "dataset.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
            return int(info["num_samples"]), info.get("class_names")
        except (ValueError, KeyError, TypeError):
            pass
    total = 0
    for tar in tars:
        stats = tar.with_name(f"{tar.stem}_stats.json")
        try:
            total += int(json.loads(stats.read_text())["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None, None
    return total, None


def _group_to_sample(tar_name: str, key: str, members: dict[str, bytes]) -> SourceSample:
    where = f"{tar_name}:{key}"
    metadata: dict[str, Any] = {}
    if "json" in members:
        try:
            parsed = json.loads(members["json"])
            if isinstance(parsed, dict):
                metadata = {k: v for k, v in parsed.items() if k not in ("id", "captions")}
        except (ValueError, UnicodeDecodeError):
            metadata = {}
    image = next((members[ext] for ext in TAR_IMAGE_EXTENSIONS if ext in members), None)
    if image is None:
        return SourceSample(None, [], where, skip_reason=MISSING_IMAGE)
    if "txt" in members:
        captions = clean_captions(members["txt"].decode("utf-8", errors="replace"))
        missing = EMPTY_CAPTION
    else:
        captions = clean_captions(metadata.get("caption"))
        missing = EMPTY_CAPTION if "caption" in metadata else MISSING_CAPTION
    label = None
    if "cls" in members:
        try:
            label = _parse_label(members["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return SourceSample(None, captions, where, skip_reason=INVALID_LABEL)
    return SourceSample(image, captions, where, label, metadata, None if captions else missing)


def _open_tar_folder(root: Path, tars: list[Path]) -> Source:
    for tar in tars:
        if not os.access(tar, os.R_OK):
            raise UsageError(f"shard {str(tar)!r} is not readable (permission denied)")
    num_samples, class_names = _count_from_metadata(root, tars)

    def samples() -> Iterator[SourceSample]:
        for tar in tars:
            group_key, group = None, {}
            try:
                # Stream mode reads each tar once, front to back, like webdataset does.
                with tarfile.open(tar, mode="r|*") as archive:
                    for member in archive:
                        if not member.isfile() or member.name.rpartition("/")[2].startswith("."):
                            continue
                        key, extension = _split_member_name(member.name)
                        if key != group_key:
                            if group_key is not None:
                                yield _group_to_sample(tar.name, group_key, group)
                            group_key, group = key, {}
                        group[extension] = archive.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError):
                # The rest of this tar cannot be trusted; the incomplete last group goes with it.
                yield SourceSample(None, [], tar.name, skip_reason=UNREADABLE_TAR)
                continue
            if group_key is not None:
                yield _group_to_sample(tar.name, group_key, group)

    return Source("img2dataset", root, samples, num_samples, class_names)
