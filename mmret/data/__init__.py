"""Data: raw sources -> pre-resized webdataset shards -> streams and the Lightning data module.

`raw_sources` (folders, tables, img2dataset output), `image_resize`, `shard_writer`, the built-in datasets
(`builtin`, `digits`, `shapes`), `shard_sets` and `samples` (reading shards), `streams` and `loaders`,
`datamodule`, and `mined_negatives` (the file format of `mmret mine` and its use in training). Imports only the
ground floor (`mmret.errors`, `mmret.io`, `mmret.distributed`, `mmret.resources`).
"""
