"""torch.distributed helpers that degrade to one process.

The same call works on one CPU, one GPU and N processes under torchrun: with no process
group, `rank()` is 0, `world_size()` is 1 and the gathers return their input.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mocoserve.core.errors import RunError, UserError

T = TypeVar("T")

# torch 2.14 renamed all_gather_into_tensor; keep working on the releases before it
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def ddp_wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP that syncs buffers once at start (rank 0's queue and weights), not every forward.

    The queue is identical on every rank by construction, so re-broadcasting it (32 MB for
    65536 x 128) each step would only cost bandwidth.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs: dict = {"device_ids": [device.index] if device.type == "cuda" else None}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    return DDP(module, **kwargs)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> torch.device:
    """Pick the device and, under torchrun, join the process group (NCCL on GPUs, gloo on CPUs)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if launched_by_torchrun() and not is_distributed():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    if use_cuda:
        return torch.device("cuda", local_rank() if launched_by_torchrun() else 0)
    return torch.device("cpu")


def teardown() -> None:
    """Leave the process group once every rank is done with it.

    The trainer's DDP wrapper and pending gloo work hold the process group; collecting
    them first (cycles keep a finished Trainer alive until the next gc) releases them
    while the group still exists, instead of during interpreter shutdown.
    """
    if is_distributed():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 (no gradient). Same shape on every rank."""
    if not is_distributed():
        return tensor
    out = torch.empty(
        (world_size() * tensor.shape[0], *tensor.shape[1:]),
        dtype=tensor.dtype,
        device=tensor.device,
    )
    _all_gather_single(out, tensor.contiguous())
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each slice's gradient over ranks and keeps this rank's.

    torch.distributed.nn.functional.all_gather does the same but is deprecated as of torch
    2.14, and its replacement lives in a private module; this is the all-reduce form that
    SimCLR/SupCon codebases use, and it runs on gloo as well as NCCL.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.n = tensor.shape[0]
        return all_gather(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[rank() * ctx.n : (rank() + 1) * ctx.n]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0; gradients flow back to every rank.

    Each rank's input gets the sum over ranks of the gradients of its slice, so with DDP's
    gradient averaging the result is the gradient of the mean of all ranks' losses.
    """
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def from_rank0(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0, its result (picklable) on every rank; an error there is the
    same UserError on every rank (no rank is left waiting)."""
    if not is_distributed():
        return compute()
    box: list[Any] = [None]
    if rank() == 0:
        try:
            box[0] = ("ok", compute())
        except UserError as e:
            box[0] = ("error", str(e))
        except Exception as e:  # an OSError writing a file: the others are told, then raise
            box[0] = ("failed", f"rank 0 failed: {type(e).__name__}: {e}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    if kind == "failed":
        raise RunError(value)
    return value


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (used to stop all ranks together)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
