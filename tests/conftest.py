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


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, digits_root):
    """A tiny DualEncoder (test-vit-micro) trained for 2 steps on digits by `mmret fit`: its last.ckpt."""
    from mmret.cli import main
    from tests.fit_args import DUAL_ENCODER, fit_argv

    run_dir = tmp_path_factory.mktemp("tiny_dual_run")
    code = main(
        fit_argv(
            module=DUAL_ENCODER,
            model_args={"warmup_steps": 1},
            train=digits_root / "train",
            samples_per_epoch=32,
            max_epochs=1,
            run_dir=run_dir,
        )
    )
    assert code == 0
    return run_dir / "checkpoints" / "last.ckpt"
