"""Several processes (GPUs) through torchrun: `torchrun --nproc_per_node N -m sslaudio pretrain ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `setup` then joins the process group (NCCL on CUDA,
gloo on the CPU) and gives each process its device (cuda:LOCAL_RANK). The design keeps a run the
same run whatever the number of processes:

- `train.batch_size` is the global batch. Every process draws the same global batch keys for a step
  (data.StepSampler, seeded by (seed, step)) and loads its contiguous `shard` of them, so the data a
  step sees does not depend on the world size, and a run can resume on another number of GPUs.
- Gradients are averaged by one flat all-reduce per step after backward (`average_gradients`),
  rather than by DistributedDataParallel's hooks: methods whose graphs skip parameters (keep-mode
  mask tokens), steps skipped for a non-finite loss, and EMA teachers then need no special case,
  and every process applies the same update, so the replicas stay identical.
- Contrastive methods see every process's embeddings through `gather_rows` (the `gather_fn` hook of
  SimCLR / MoCo: a differentiable all-gather, as the official SimCLR / MoCo v3 code gathers
  negatives across devices).
- Only rank 0 writes the run folder (config, log, checkpoints, export); the loss it logs is the mean
  over processes.

Randomness that is not the data (dropout, masks, augmentations) is drawn per process from
(seed, step, rank), so processes do not repeat each other's masks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> slice:
        """This process's contiguous rows of a global batch of n (n divisible by the size)."""
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def from_env() -> World:
    """The world torchrun describes in the environment (a single process without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def setup(world: World, device: str) -> torch.device:
    """Join the process group (once) and return this process's device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not world.active:
        return torch.device(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        dev = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev


def finish(world: World) -> None:
    """After a run that ended well on every process: wait until all are done (rank 0 writes the
    last checkpoint after the others have finished their steps), so that no process tears the
    group down while another still uses it (a gloo rank could abort at exit then)."""
    if world.active and dist.is_initialized():
        dist.barrier()


def teardown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Replace every gradient by its mean over processes: one all-reduce of a flat buffer per dtype.
    A parameter without a gradient here keeps none only if it has none on every process (the
    graphs are the same on every process, so this is the single-process behaviour)."""
    if not world.active:
        return
    have = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                        device=params[0].device if params else "cpu")
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    dist.all_reduce(have)  # how many processes have each gradient
    used = {id(p) for p, n in zip(params, have.tolist()) if n > 0}
    for group in by_dtype.values():
        group = [p for p in group if id(p) in used]
        if not group:
            continue
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world.size)
        offset = 0
        for p in group:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p)
            offset += n


def mean_scalar(x: Tensor, world: World) -> Tensor:
    """The mean over processes of a () tensor (the logged loss; also a consistent finiteness test)."""
    if not world.active:
        return x
    x = x.detach().float().clone()
    dist.all_reduce(x)
    return x / world.size


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every process's copy and returns this
    process's slice (the gradient of a loss computed identically on every process)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """losses.GatherFn: local rows (N, D) -> every process's rows (world * N, D), and the offset of
    this process's rows in them. Differentiable; every process must pass the same N."""
    return _AllGather.apply(x), dist.get_rank() * x.shape[0]


def check_in_sync(params: list[torch.nn.Parameter], world: World) -> None:
    """Raise if the processes' weights differ (a cheap checksum, compared at every checkpoint)."""
    if not world.active:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).double() for p in params])
        local = torch.stack([flat.sum(), flat.square().sum(), (flat * torch.arange(
            flat.numel(), device=flat.device, dtype=torch.float64).remainder(97)).sum()])
    sums = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(sums, local)
    if any(not torch.allclose(s, sums[0], rtol=1e-9, atol=1e-9) for s in sums[1:]):
        raise RuntimeError("the processes' weights diverged; please report this as a bug")
