"""Run a test function in real 2-process gloo process groups on CPU.

    def _worker(rank, world_size, out_dir): ...   # module-level, so it pickles
    run_ddp(_worker, world_size=2, args=(tmp_path,))

Each worker runs with an initialised default process group; exceptions in any rank fail the test with the
rank's traceback. Lightning's own spawned ranks (`strategy="ddp_spawn"`) take the `LeaveTogether` callback
for the same clean exit.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Callback


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, error_queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
        # Leave together: a rank that tears gloo down while the other still talks to it can abort the other
        # process ("terminate called without an active exception"), seen once on a loaded 2-core box.
        dist.barrier()
    except BaseException:
        error_queue.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ddp(fn: Callable, world_size: int = 2, args: tuple = ()) -> None:
    """Spawn `world_size` gloo ranks running fn(rank, world_size, *args); re-raise the first failure."""
    ctx = mp.get_context("spawn")
    error_queue = ctx.SimpleQueue()
    try:
        mp.spawn(_entry, args=(world_size, free_port(), fn, args, error_queue), nprocs=world_size, join=True)
    except Exception as err:
        details = [] if error_queue.empty() else [error_queue.get()]
        message = "\n".join(f"rank {rank}:\n{tb}" for rank, tb in details) or str(err)
        raise AssertionError(f"DDP worker failed:\n{message}") from None


class LeaveTogether(Callback):
    """Close gloo on every Lightning rank at teardown, after a barrier, rather than at interpreter exit.

    Left to exit, a gloo thread still running can abort a spawned rank after a fit that succeeded (rare,
    on a loaded 2-core box), which fails the test for nothing it asserts.
    """

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
