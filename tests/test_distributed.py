"""Two gloo processes: differentiable gathers, distributed SupCon, cross-rank shuffle BN, queue."""

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mocoserve.train import distributed
from mocoserve.train.losses import supcon_loss

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fn_name: str, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        globals()[fn_name](rank)
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def run_distributed(fn_name: str) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(_free_port(), fn_name, errors), nprocs=WORLD, start_method="spawn"
    )
    if not errors.empty():
        pytest.fail(errors.get())


def _global_features():
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(WORLD * 3, 2, 8, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    return feats, labels


def check_supcon_gathered_equals_single_process(rank: int) -> None:
    feats, labels = _global_features()
    # the reference: one process, the whole batch; its loss is the mean over all anchors
    full = feats.clone().requires_grad_(True)
    supcon_loss(full, labels, 0.1, 0.07).backward()
    mine = feats[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)
    loss = supcon_loss(mine, labels[rank * 3 : (rank + 1) * 3], 0.1, 0.07, gather_distributed=True)
    loss.backward()
    # each rank's input gradient sums every rank's loss; DDP then divides by the world size
    grad = mine.grad / WORLD
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    expected = supcon_loss(feats, labels, 0.1, 0.07)
    torch.testing.assert_close(mean_loss / WORLD, expected)
    torch.testing.assert_close(grad, full.grad[rank * 3 : (rank + 1) * 3])


def check_gathers(rank: int) -> None:
    x = torch.full((2, 3), float(rank), requires_grad=True)
    gathered = distributed.all_gather_with_grad(x)
    assert gathered[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    (gathered * torch.arange(4.0).view(4, 1)).sum().backward()
    # d/dx of sum over both ranks' losses: each rank's slice weighted, summed over ranks
    expected = torch.tensor([[0.0], [1.0]]) + 2 * rank
    torch.testing.assert_close(x.grad, (expected * WORLD).expand(2, 3))
    assert distributed.any_rank(rank == 1, torch.device("cpu")) is True
    assert distributed.any_rank(False, torch.device("cpu")) is False


def check_moco_shuffle_and_queue(rank: int) -> None:
    from mocoserve.train.methods import MoCo
    from tests.test_methods import tiny_cfg

    torch.manual_seed(0)  # same weights on both ranks
    moco = MoCo(tiny_cfg())
    moco.queue_size = 10
    moco.eval()  # eval BN: a sample's key does not depend on its batch-mates
    torch.manual_seed(100 + rank)  # different images and permutations per rank
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain = F.normalize(moco.key_encoder(x), dim=1)
    keys = moco._keys(x)  # gathered, permuted across ranks by rank 0, unshuffled
    torch.testing.assert_close(keys, plain, rtol=1e-5, atol=1e-6)
    moco._enqueue(keys)
    both = distributed.all_gather(keys)
    torch.testing.assert_close(moco.queue[:6], both)  # every rank enqueued every rank's keys
    assert int(moco.queue_ptr) == 6
    queues = distributed.all_gather(moco.queue.unsqueeze(0))
    torch.testing.assert_close(queues[0], queues[1])


@pytest.mark.parametrize(
    "check",
    [
        "check_supcon_gathered_equals_single_process",
        "check_gathers",
        "check_moco_shuffle_and_queue",
    ],
)
def test_two_gloo_processes(check):
    run_distributed(check)
