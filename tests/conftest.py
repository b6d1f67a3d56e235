"""Shared pytest set-up: offline by default, deterministic threads, and the `gpu` tier gate."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: asking for them (-m gpu) without a device is an error, not a silent skip."""
    import torch

    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not torch.cuda.is_available():
        selected = config.getoption("-m") or ""
        if "gpu" in selected and "not gpu" not in selected:
            raise pytest.UsageError("`-m gpu` was asked for but no CUDA device is visible")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """The built-in digits dataset (real scans), built once per test session: ROOT/{train,val,test}."""
    from mmret.data.builtin import build_dataset

    root = tmp_path_factory.mktemp("builtin") / "digits"
    build_dataset("digits", root, seed=0, image_size=64, progress=False)
    return root
