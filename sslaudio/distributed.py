"""Several processes (GPUs) through torchrun: `torchrun --nproc_per_node N -m sslaudio pretrain ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `setup` then joins the process group (NCCL on CUDA,
gloo on the CPU) and gives each process its device (cuda:LOCAL_RANK). The design keeps a run the
same run whatever the number of processes:

- `train.batch_size` is the global batch. Every process draws the same global batch keys for a step
  (data.StepSampler, seeded by (seed, step)) and loads its contiguous `shard` of them, so the data a
  step sees does not depend on the world size, and a run can resume on another number of GPUs.
- Gradients are averaged by DistributedDataParallel (`train.parallel: ddp`, the default;
  `wrap_ddp`):
  its autograd hooks all-reduce buckets of gradients while backward is still running, so the
  communication hides behind the computation. Only the step's forward / backward goes through the
  wrapper; everything else (after_step, param_groups, checkpoints, gather_fn) talks to the bare
  method, so checkpoints have the same keys at any world size. Buffers stay per process
  (BatchNorm statistics, queues, mixup memories: as one process per GPU in the official codes;
  SyncBatchNorm on CUDA). Parameters a step leaves unused (keep-mode mask tokens, a prototype
  layer frozen for the first steps) need DDP's unused-parameter search, an extra graph traversal
  per step; it is on unless the method sets `ddp_find_unused_parameters = False`. A step skipped
  for a non-finite loss runs no backward on any process (the verdict comes from the all-reduced
  loss), which DDP allows; every process then applies the same update, so the replicas stay
  identical (`check_in_sync` compares them at every checkpoint).
- `train.parallel: allreduce` averages the gradients by one flat all-reduce per step after
  backward (`average_gradients`) instead: no overlap, but no DDP either, the way out for a method
  whose graph DDP cannot follow.
- `train.parallel: fsdp` (`shard_fsdp`): FSDP2 `fully_shard` of every transformer block (the EMA
  teacher's too) and of the method, for a model that does not fit one GPU: parameters, gradients
  and optimizer state are DTensor shards, gathered per block for its forward and backward. EMA
  updates run on the shards. Checkpoints are gathered whole (`full_state`) and written by rank 0
  in the single-process format, so they resume with any number of processes and any mode; the
  replica checksum does not apply (the shards differ by design). Works on the CPU over gloo too.
- Contrastive methods see every process's embeddings through `gather_rows` (the `gather_fn` hook of
  SimCLR / MoCo: a differentiable all-gather, as the official SimCLR / MoCo v3 code gathers
  negatives across devices).
- Only rank 0 writes the run folder (config, log, checkpoints, export); the loss it logs is the mean
  over processes.

Randomness that is not the data (dropout, masks, augmentations) is drawn per process and
micro-batch (`train.grad_accum`) from (seed, step, rank * grad_accum + micro-batch), so processes do
not repeat each other's masks, and N processes draw what one process with grad_accum N draws.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sslaudio.config import ConfigError


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


def setup(world: World, dev: torch.device) -> torch.device:
    """Join the process group (once) and return this process's device: `dev` (checked by
    train.pick_device) with a CUDA device replaced by cuda:LOCAL_RANK."""
    if dev.type == "cuda":
        dev = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev


def wrap_ddp(method: torch.nn.Module, dev: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """`method` in DistributedDataParallel for its forward / backward (see the module docstring).
    Buffers are not broadcast at each forward (per-process statistics, as before DDP)."""
    from torch.nn.parallel import DistributedDataParallel

    # torch >= 2.12 renamed broadcast_buffers (the old name warns)
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(
        method, device_ids=[dev.index] if dev.type == "cuda" else None, **{sync: False},
        find_unused_parameters=getattr(method, "ddp_find_unused_parameters", True))


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
        except ImportError:
            raise ConfigError(f"train.parallel: fsdp needs FSDP2 (torch >= 2.4; this is {torch.__version__})") from None
    return fully_shard


def _dtensor():
    try:
        import torch.distributed.tensor as dtensor  # torch >= 2.5
    except ImportError:
        import torch.distributed._tensor as dtensor
    return dtensor


def check_fsdp() -> None:
    """A one-line ConfigError now, before anything runs, if this torch has no FSDP2."""
    _fully_shard()


def is_sharded(t: Tensor) -> bool:
    """A DTensor (an FSDP2 parameter, its gradient or optimizer state); False without FSDP2."""
    return isinstance(t, _dtensor().DTensor)


def shard_fsdp(method: torch.nn.Module, units: list[torch.nn.Module], optimizer: torch.optim.Optimizer,
               make_optimizer) -> torch.optim.Optimizer:
    """FSDP2: `fully_shard` every module of `units` (the transformer blocks, the EMA teacher's too),
    then the method (everything else: one more unit). Parameters become DTensors sharded over the
    processes (dim 0); buffers stay whole. fully_shard replaces the parameters, so the optimizer is
    made again (`make_optimizer()`, the same groups in the same order) and the state of `optimizer`
    (fresh, or loaded whole from a checkpoint) is handed over as the matching shards.

    EMA teachers (ema.ema_update) work on the shards: teacher and student tensors are sharded
    alike, and the foreach update is elementwise. The teacher's forward gathers its parameters
    like any other unit's."""
    fully_shard = _fully_shard()
    for unit in units:
        fully_shard(unit)
    fully_shard(method)
    full = optimizer.state_dict()
    new = make_optimizer()
    params = [p for g in new.param_groups for p in g["params"]]

    def shard(v, p):
        if isinstance(v, Tensor) and is_sharded(p) and v.shape == p.shape:
            # every process holds the whole tensor: each takes its shard, without communication
            # where torch lets it (2.6+; before, rank 0's copy is scattered: the same values)
            dt = _dtensor().distribute_tensor
            local = {"src_data_rank": None} if "src_data_rank" in inspect.signature(dt).parameters else {}
            return dt(v.to(p.device), p.device_mesh, p.placements, **local)
        return v

    new.load_state_dict({"state": {i: {k: shard(v, params[i]) for k, v in st.items()} for i, st in full["state"].items()},
                         "param_groups": full["param_groups"]})
    return new


def set_gradient_sync(method: torch.nn.Module, sync: bool) -> None:
    """FSDP2: reduce-scatter the gradients in this backward or keep accumulating them unsharded
    (grad_accum's first micro-batches, as DDP's no_sync)."""
    method.set_requires_gradient_sync(sync)


def full_state(method: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World):
    """Under FSDP2, (model, optimizer) views with whole tensors for checkpoint.save and
    export_encoder, gathered one tensor at a time (every process takes part; rank 0 keeps them, on
    the CPU). The checkpoint is then the one a single process writes: it resumes with any number
    of processes and either parallel mode."""

    def whole(t):
        if is_sharded(t):
            t = t.full_tensor()
        return t.detach().cpu() if world.main else None

    model = {k: whole(v) for k, v in method.state_dict().items()}
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: whole(v) if isinstance(v, Tensor) else v for k, v in st.items()}
                   for i, st in sorted(sd["state"].items())}
    return _WholeMethod(method, model), _WholeOptimizer(sd)


class _WholeMethod:
    """What checkpoint.save and export_encoder read of a method, with whole tensors."""

    def __init__(self, method: torch.nn.Module, tensors: dict[str, Tensor]):
        self.tensors = tensors
        names = {id(m): n for n, m in method.named_modules()}
        self.frontend = _WholeModule(tensors, names[id(method.frontend)])
        self._encoder = _WholeModule(tensors, names[id(method.inference_encoder())])

    def state_dict(self) -> dict[str, Tensor]:
        return self.tensors

    def inference_encoder(self):
        return self._encoder


class _WholeModule:
    def __init__(self, tensors: dict[str, Tensor], prefix: str):
        self.tensors = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

    def state_dict(self) -> dict[str, Tensor]:
        return self.tensors


class _WholeOptimizer:
    def __init__(self, sd: dict):
        self.sd = sd

    def state_dict(self) -> dict:
        return self.sd


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


def mean_scalar_and_count(x: Tensor, flag: bool, world: World) -> tuple[Tensor, Tensor]:
    """The mean over processes of the () tensor x and the number of processes whose flag is set,
    from one all-reduce: the step's loss and whether any process was asked to stop, so that every
    process stops after the same step, read in the step's one host sync."""
    out = torch.stack([x.detach().float(), torch.full((), float(flag), device=x.device)])
    if world.active:
        dist.all_reduce(out)
    return out[0] / world.size, out[1]


def max_scalar(x: Tensor, world: World) -> Tensor:
    """The max over processes of a () tensor (no NaN: gloo and NCCL do not agree on it)."""
    if not world.active:
        return x
    x = x.detach().float().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


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


def rank_buffers(module: torch.nn.Module, world: World) -> dict[str, Tensor]:
    """The buffers whose values differ between processes (a mixup memory or a queue each process
    fills with its own clips), every process's copy but rank 0's (the checkpoint's own), as
    {"RANK/name": tensor}; {} in one process. Collective: every process calls it, at a checkpoint."""
    if not world.active or world.size == 1:
        return {}
    out = {}
    for name, b in module.named_buffers():
        t = b.detach().reshape(-1)
        t = t.view(torch.uint8) if t.dtype == torch.bool else t  # bool: not every backend gathers it
        parts = [torch.empty_like(t) for _ in range(world.size)]
        dist.all_gather(parts, t.contiguous())
        if any(not torch.equal(parts[0], p) for p in parts[1:]):
            for r in range(1, world.size):
                out[f"{r}/{name}"] = parts[r].view(b.dtype).reshape(b.shape)
    return out


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
