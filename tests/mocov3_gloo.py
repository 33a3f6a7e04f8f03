"""MoCo v3's gathered-keys check in two gloo processes; a light module, since every spawned
process imports it (tests/test_mocov3.py's own imports would cost each one seconds)."""

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mocoserve.train.losses import moco_v3_symmetric_loss

WORLD, N = 2, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch() -> list[torch.Tensor]:
    """q1, q2, k1, k2 of the global batch (WORLD * N rows each), L2-normalised."""
    g = torch.Generator().manual_seed(0)
    return [
        F.normalize(torch.randn(WORLD * N, 8, generator=g, dtype=torch.float64), dim=1)
        for _ in range(4)
    ]


def check_gathered_keys(rank: int) -> None:
    """Each rank's loss over its N queries against every rank's keys: their mean is the
    one-process loss of the global batch, and each rank's gradient its slice of that one's."""
    q1, q2, k1, k2 = global_batch()
    full = [q1.clone().requires_grad_(True), q2.clone().requires_grad_(True)]
    moco_v3_symmetric_loss(full[0], full[1], k1, k2, 0.2, gather_distributed=False).backward()
    mine = slice(rank * N, (rank + 1) * N)
    local = [q1[mine].clone().requires_grad_(True), q2[mine].clone().requires_grad_(True)]
    loss = moco_v3_symmetric_loss(local[0], local[1], k1[mine], k2[mine], 0.2)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    expected = moco_v3_symmetric_loss(q1, q2, k1, k2, 0.2, gather_distributed=False)
    torch.testing.assert_close(mean_loss / WORLD, expected)
    for ours, reference in zip(local, full, strict=True):  # DDP averages: grad / world size
        torch.testing.assert_close(ours.grad / WORLD, reference.grad[mine])


def _worker(rank: int, port: int, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        check_gathered_keys(rank)
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def run_two_processes() -> None:
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(_free_port(), errors), nprocs=WORLD, start_method="spawn")
    if not errors.empty():
        pytest.fail(errors.get())
