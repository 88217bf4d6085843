"""The one training loop, for every method (nanoGPT-style: the loop itself fits on one screen).

Learning rate and EMA momentum are pure functions of the step. Every random draw is seeded by
(seed, step): the batch (data.py), the augmentation / mask generator handed to the method, and the
global torch RNG (dropout). A run stopped at step k and resumed therefore ends with the same
weights as an uninterrupted one (bit-identical on the CPU).

Crash safety. One process at a time writes a run folder (runlock.py: RUN/.lock). Nothing of an
old run is touched before the new configuration and the data are checked; `--no-resume` moves the
old run aside (RUN/.replaced-*) and deletes it only once the new run has committed a checkpoint.
SIGINT / SIGTERM do not interrupt a step: the loop finishes the step, commits it and raises
`Interrupted` (a second signal, a second or more later, stops at once without that step; during a
commit it waits for the commit). Under torchrun a signal to any process stops every process
after the same step (the requests ride on the step's loss all-reduce), so that step's commit is
collective as a periodic one. A step is committed only after the model state is checked to be
finite, so a checkpoint never holds a diverged model. What a SIGKILL leaves (a temp step folder,
temp files) is removed at the next start.

Under torchrun every process runs this loop on its shard of the global batch (distributed.py);
rank 0 alone locks and writes the run folder. The step's forward / backward goes through
DistributedDataParallel (`train.parallel: ddp`), whose hooks all-reduce the gradients while backward
runs; `allreduce` averages them after backward in one flat all-reduce instead (a way out for a
method DDP cannot follow); `fsdp` shards the transformer blocks and the method with FSDP2 and
gathers full tensors for the checkpoints. Everything but the step itself (after_step, checkpoints,
the health check) uses the bare method, so checkpoints look the same with any of them.

`train.grad_accum` splits each process's rows into micro-batches: all but the last run forward
and backward at once (DDP without its all-reduce, `no_sync`), each loss scaled by 1 / grad_accum;
the last one's backward waits for the step's one host sync (the mean loss over micro-batches and
processes, so every process skips a non-finite step alike). Each micro-batch draws its own
augmentations, masks and dropout from (seed, step, rank * grad_accum + micro-batch), so a resume
stays bit-identical and one process with grad_accum N draws what N processes draw. Batch
statistics (BatchNorm, in-batch negatives, a method's mixup memory) are those of a micro-batch.
`train.compile` compiles the step (torch.compile of what the step calls), and
`train.activation_checkpointing` switches on `activation_checkpointing` in every module that has it
(the transformer stacks).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from sslaudio import checkpoint, distributed, optim
from sslaudio.atomic import atomic_text
from sslaudio.build import build_method
from sslaudio.config import ConfigError, OptimConfig, Preset, dump_yaml
from sslaudio.data import (
    CropDataset,
    DataError,
    loader,
    sample_batches,
    sample_for_stats,
    scan,
    validate,
)
from sslaudio.encoders.layers import Block
from sslaudio.inference import load_encoder
from sslaudio.interrupts import Interrupted, StopSignals, worker_init
from sslaudio.runfolder import (
    data_digest,
    mismatch,
    move_aside,
    remove_leftovers,
)
from sslaudio.runlock import RunLock

MAX_ABS_STATE = 1e12  # a weight or buffer beyond this (or non-finite) stops the run: it has diverged


class TrainingDiverged(Exception):
    """Repeated non-finite losses, or a model state that became non-finite (exit code 3)."""


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to lr * min_lr_ratio (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def weight_decay_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """optim.weight_decay, or a cosine from it to optim.weight_decay_end over the run (the official
    DINO / ATST `cosine_scheduler(wd, wd_end, ...)` per step)."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    frac = min(step / max(max_steps, 1), 1.0)
    return cfg.weight_decay_end - (cfg.weight_decay_end - cfg.weight_decay) * (1 + math.cos(math.pi * frac)) / 2


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix-style mixing; stable across runs and platforms)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def check_batch_fits(preset: Preset, micro_batch: int) -> None:
    """A ConfigError when one (micro-)batch of crops needs more memory than the machine has for the
    float32 audio alone: such a run would spend minutes filling memory and then die in a loader
    worker or the allocator, far from the setting that caused it."""
    d = preset.data
    need = micro_batch * d.segments * d.clip_seconds * d.sample_rate * 4
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare with
        return
    if have > 0 and need > have:
        raise ConfigError(f"train.batch_size {preset.train.batch_size}: one batch of {micro_batch} x {d.segments} "
                          f"crop(s) of {d.clip_seconds} s at {d.sample_rate} Hz is {need / 1e9:.1f} GB of audio "
                          f"alone, more than this machine's {have / 1e9:.1f} GB of memory")


def pick_device(name: str) -> torch.device:
    """auto, cpu, cuda, cuda:N or mps; anything else (torch's meta, an unknown name, a CUDA index
    past the last GPU) is a ValueError naming the value, before any model or data touches it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
                             f" (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: no MPS device is available")
    return dev


def resolve_device(name: str) -> torch.device:
    """pick_device for a user-given --device: a bad name is a ConfigError (one line, exit code 2)."""
    try:
        return pick_device(name)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None


class _Log:
    """RUN/log.jsonl, one JSON object per logged step."""

    def __init__(self, path: Path, start_step: int):
        # drop lines past the checkpoint we resume from, so the log matches the weights (and a
        # line cut short by a killed process)
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if (row := _json_or_none(ln)) is not None
                    and row.get("step", 0) <= start_step]
            atomic_text(path, "".join(ln + "\n" for ln in keep))
        self.f = path.open("a")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _json_or_none(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _read_logged(logged: dict[str, torch.Tensor]) -> dict[str, float]:
    """The method's logged scalars (loss aside) as floats: the device ones in one read (one host
    sync at a log step, not one per value)."""
    keys = [k for k in logged if k != "loss"]
    on_device = [k for k in keys if logged[k].device.type != "cpu"]
    values = {}
    if on_device:
        values = dict(zip(on_device, torch.stack([logged[k].float().reshape(()) for k in on_device]).tolist()))
    return {k: values[k] if k in values else float(logged[k]) for k in keys}


def _state_max_abs(module: nn.Module, sharded: distributed.World | None = None) -> torch.Tensor:
    """max |x| over every floating-point parameter and buffer, as a device scalar (NaN if any is
    NaN), in one foreach kernel per dtype; no host sync. `sharded` (FSDP): over every process's
    shards (NaN as inf), the same verdict everywhere."""
    ts = [t.detach() for t in itertools.chain(module.parameters(), module.buffers())
          if t.is_floating_point() and t.numel()]
    if sharded is None:
        return torch.stack([n.float() for n in torch._foreach_norm(ts, float("inf"))]).max()
    device = next(itertools.chain(module.parameters(), module.buffers())).device
    ts = [t for t in (t.to_local() if distributed.is_sharded(t) else t for t in ts) if t.numel()]  # a shard may be empty
    norms = [n.float() for n in torch._foreach_norm(ts, float("inf"))] if ts else []
    worst = torch.stack([torch.zeros((), device=device), *norms]).max()
    return distributed.max_scalar(torch.nan_to_num(worst, nan=math.inf), sharded)


def _worst_tensor(module: nn.Module) -> str:
    bad = [(n, float((t.full_tensor() if distributed.is_sharded(t) else t).detach().float().abs().max()))
           for n, t in module.state_dict().items() if t.is_floating_point() and t.numel()]
    name, value = max(bad, key=lambda nv: (not nv[1] <= MAX_ABS_STATE, nv[1] if nv[1] == nv[1] else math.inf))
    return f"{name} = {value:.3g}"


def _compile_error(e: BaseException) -> bool:
    exc = sys.modules.get("torch._dynamo.exc")
    return exc is not None and isinstance(e, exc.TorchDynamoException)


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:300]


def resolve_sources(preset: Preset, resume_from: Path | None = None) -> Preset:
    """Record, in the method section, the preset of every checkpoint the method reads
    (`Method.sources`) as `<name>_preset`: from the config.yaml of `resume_from` (the run being
    resumed) when that run read the same source (so the source may be gone by then), else from the
    source itself."""
    from sslaudio.build import load_components
    from sslaudio.config import component_config, load_preset_dict
    from sslaudio.registry import METHODS

    load_components()
    method_cls, cfg = component_config(METHODS, preset.method, "method")
    names = method_cls.sources(cfg)
    if not names:
        return preset
    saved = {}
    if resume_from is not None and (resume_from / "config.yaml").is_file():
        try:
            saved = load_preset_dict(str(resume_from / "config.yaml")).get("method") or {}
        except Exception:  # an unreadable config.yaml is reported by the resume checks
            saved = {}
    method = dict(preset.method)
    for name, spec in names.items():
        key = f"{name}_preset"
        if method.get(key):
            continue
        same = all(saved.get(k) == v for k, v in preset.method.items() if k != key)
        if same and saved.get(key):
            method[key] = saved[key]
            continue
        try:
            method[key] = load_encoder(spec).preset.to_dict()
        except (checkpoint.CheckpointError, OSError) as e:
            raise ConfigError(f"method: cannot read the checkpoint {spec!r} ({str(e).splitlines()[0]})") from None
    return dataclasses.replace(preset, method=method)


def fit(preset: Preset, inputs: list[str], run_dir: str | Path, resume: bool = True, device: str = "auto",
        on_log: Callable[[int, int, dict | None], None] | None = None, warn=None,
        cache: str | Path | None = None) -> dict:
    """Train `preset` on the audio in `inputs` into `run_dir`. Returns a summary dict.

    on_log(start_step, total_steps, None) is called once before the first step, then
    on_log(done, total_steps, row) at every logged step with the row written to log.jsonl
    (rank 0 only under torchrun). The method is built (so its components are checked), the run
    folder locked (RunLocked) and the data scanned before anything in the run folder changes.
    SIGINT / SIGTERM end the call with `Interrupted` after committing the last finished step."""
    run = Path(run_dir)
    world = distributed.from_env()
    tc = preset.train
    if tc.batch_size % (world.size * tc.grad_accum):
        raise ConfigError(f"train.batch_size {tc.batch_size} (the global batch) must be divisible by the "
                          f"{world.size} processes" + (f" x train.grad_accum {tc.grad_accum}" if tc.grad_accum > 1 else ""))
    check_batch_fits(preset, tc.batch_size // (world.size * tc.grad_accum))
    if tc.parallel == "fsdp" and world.active:
        distributed.check_fsdp()
    if not world.main:
        warn, on_log = (lambda m: None), None
    created = world.main and not run.exists()
    lock = RunLock(run) if world.main else None
    with StopSignals(announce=world.main) as stops:
        try:
            dev = pick_device(device)
            if world.active:
                dev = distributed.setup(world, dev)
            preset = resolve_sources(preset, run if resume else None)
            torch.manual_seed(preset.seed)
            method = build_method(preset).to(dev)
            if lock is not None:
                with stops.protect():  # never a descriptor of a held lock lost to a signal
                    lock.acquire()
            summary = _train(preset, inputs, run, resume, dev, world, method, stops, lock, on_log, warn, cache)
            distributed.finish(world)
            return summary
        finally:
            stops.deferring = True  # cleaning up: a signal now only records itself
            if lock is not None:
                with stops.protect():
                    lock.release()
            if created:
                try:  # nothing was written (a bad DATA, a refused config): leave no empty folder
                    run.rmdir()
                except OSError:
                    pass
            distributed.teardown(world)


def _train(preset: Preset, inputs: list[str], run: Path, resume: bool, dev: torch.device, world, method: nn.Module,
           stops: StopSignals, lock: RunLock | None, on_log, warn, cache: str | Path | None = None) -> dict:
    tc, seed = preset.train, preset.seed
    last = checkpoint.latest(run, warn) if resume else None  # warn None: checkpoint's own default
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    saved = json.loads((last / "state.json").read_text()) if last is not None else {}
    if last is not None and saved.get("identity") != preset.identity():
        raise mismatch(run, saved, preset)
    if world.main:
        remove_leftovers(run)
        if resume:
            for d in sorted(run.glob(".replaced-*")):
                warn(f"{d} holds a run that --no-resume was replacing when it stopped, before the new run "
                     f"saved a checkpoint; move its files back into {run} to resume that run, or delete it")

    infos, skipped = validate(scan(inputs), preset.data.min_seconds, warn, cache=cache)  # --cache: no re-probing
    if not infos:
        raise DataError(f"no usable audio file in {' '.join(inputs)} ({len(skipped)} skipped)")
    digest = data_digest(infos)
    if saved.get("data_sha256") not in (None, digest):
        warn(f"DATA is not the list of files this run was trained on ({saved.get('files')} files then, "
             f"{len(infos)} now): the resumed run will not match an uninterrupted one")
    dataset = CropDataset.open(infos, preset.data, seed, cache, saved, warn)  # --cache: before the run folder changes
    drop_replaced = False
    if world.main:  # the first change to the run folder, once the configuration and the data are known good
        with stops.protect():
            if not resume and checkpoint.step_dirs(run):
                move_aside(run)
            drop_replaced = not resume
            atomic_text(run / "config.yaml", dump_yaml(preset))

    if world.active:
        method.gather_fn = distributed.gather_rows  # negatives / batch statistics of every process
        if dev.type == "cuda":  # batch statistics over the global batch, as one big-batch process
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    params = [p for p in method.parameters() if p.requires_grad]

    def make_optimizer() -> torch.optim.Optimizer:
        return optim.adamw(method.param_groups(preset.optim.weight_decay), preset.optim)  # fused AdamW

    optimizer = make_optimizer()
    # the groups a weight-decay schedule drives (indices: a resume replaces the group dicts)
    decaying = [i for i, g in enumerate(optimizer.param_groups) if g["weight_decay"] > 0]
    start, state, own = 0, {}, None
    if last is not None:
        model_t, optim_t, optim_meta, saved = checkpoint.load_step(last)
        method.load_state_dict(model_t)
        checkpoint.load_optimizer(optimizer, optim_t, optim_meta)
        start = saved["step"]
        own = checkpoint.load_rank_state(last, saved, world.rank)
        if own is not None and saved.get("world_size") != world.size and world.main:
            warn(f"{last.name} holds the per-process buffers of {saved.get('world_size')} processes; with "
                 f"{world.size} every process resumes from rank 0's (mixup memories, queues), so the run "
                 f"continues but not as it would have uninterrupted")
        elif saved.get("rank_buffers") == "not gathered" and world.main:
            warn(f"{last.name} was saved on an interrupt by {saved.get('world_size')} processes, without the "
                 f"other processes' own buffers (mixup memories, queues, where the method has them): every "
                 f"process resumes from rank 0's copies, so the run continues but not exactly as it would have "
                 f"uninterrupted")
    else:
        for name, spec in method.sources(method.cfg).items():  # e.g. HuBERT's iteration-1 model
            getattr(method, name).load_state_dict(load_encoder(spec).state_dict())
        method.prepare(sample_for_stats(dataset, preset.data.norm_samples, seed).to(dev),
                       functools.partial(sample_batches, dataset, seed, dev))
    state["method"] = method.run_info()
    if tc.activation_checkpointing:
        flagged = [m for m in method.modules() if hasattr(m, "activation_checkpointing")]
        for m in flagged:
            m.activation_checkpointing = True
        if not flagged:
            warn(f"train.activation_checkpointing: {preset.method.get('name')} has no module that recomputes "
                 f"its activations (transformer blocks do); the option does nothing here")
    fsdp = world.active and tc.parallel == "fsdp"
    if fsdp:  # once the weights and the optimizer state are in place, whole
        optimizer = distributed.shard_fsdp(method, [m for m in method.modules() if isinstance(m, Block)],
                                           optimizer, make_optimizer)
        params = [p for p in method.parameters() if p.requires_grad]
    # what the step calls: DistributedDataParallel around the method under torchrun (its hooks average
    # the gradients during backward), compiled with train.compile. Everything else (after_step,
    # checkpoints, the health check) uses `method` itself: no `module.` / `_orig_mod.` key prefixes.
    ddp = distributed.wrap_ddp(method, dev) if world.active and tc.parallel == "ddp" else None
    if own and saved.get("world_size") == world.size:  # after DDP's broadcast of rank 0's buffers
        method.load_state_dict(own, strict=False)  # this process's memories, as they were
    model = ddp if ddp is not None else method
    if tc.compile:
        model = torch.compile(model)
    micro = tc.grad_accum

    precision = tc.precision if tc.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    workers = min(preset.data.num_workers, os.cpu_count() or 1)
    batches = loader(dataset, tc.batch_size, seed, start, tc.steps, workers, world.shard(tc.batch_size))
    if workers:
        batches.worker_init_fn = functools.partial(worker_init, lock.handle() if lock is not None else None)
    log = _Log(run / "log.jsonl", start) if world.main else None
    crop_h = tc.batch_size * preset.data.segments * preset.data.clip_seconds / 3600
    # carried across a resume, so that the next log row and the non-finite count are an uninterrupted run's
    nonfinite, loss_sum, n_sum = saved.get("nonfinite", 0), saved.get("log_loss_sum", 0.0), saved.get("log_steps", 0)
    t0, t_last, step = time.time(), time.time(), start
    waited, t_asked = 0.0, time.perf_counter()  # seconds spent waiting for batches since the last log row
    state.update({"skipped_files": len(skipped), "files": len(infos), "world_size": world.size,
                  "data_sha256": digest, "cache": dataset.cache is not None})
    health, health_at, committed = None, start, start  # max |state| after step health_at, not yet checked

    def check_health(value: float) -> None:
        nonlocal health
        health = None
        if not value <= MAX_ABS_STATE:  # NaN too
            raise TrainingDiverged(f"weights became non-finite (or exceeded 1e12) at step {health_at} "
                                   f"({_worst_tensor(method)}); try a lower optim.lr")

    def commit(at: int) -> None:  # collective under torchrun: every process commits the same step
        nonlocal committed, drop_replaced
        if health is not None:  # nothing non-finite is ever committed
            check_health(float(health))
        if not fsdp:  # (FSDP: the shards differ)
            distributed.check_in_sync(params, world)
        # FSDP: whole tensors gathered by every process (rank 0 keeps them): the same checkpoint
        whole, whole_optimizer = distributed.full_state(method, optimizer, world) if fsdp else (method, optimizer)
        # every process's own buffers (mixup memories, ...), so that a resume continues each of them
        ranks = distributed.rank_buffers(method, world)  # FSDP2: buffers stay whole
        if world.main:
            with stops.protect():
                try:
                    checkpoint.save(run, at, whole, whole_optimizer, preset, {**state, "nonfinite": nonfinite,
                                    "log_loss_sum": loss_sum, "log_steps": n_sum}, tc.keep_last, ranks)
                except checkpoint.NonFiniteWeights as e:  # the optimizer state, which the health check skips
                    raise TrainingDiverged(f"{e}; try a lower optim.lr") from None
                checkpoint.export_encoder(run / "export" / "encoder.safetensors", whole, preset, step=at)
                if drop_replaced:  # the new run has a checkpoint: the one it replaces can go
                    for d in run.glob(".replaced-*"):
                        shutil.rmtree(d, ignore_errors=True)
                    drop_replaced = False
        committed = at

    def stop(at: int):  # a signal asked to stop (under torchrun: every process agreed); `at` steps are done
        if at > committed:
            commit(at)
        # as at a normal end: no process tears the group down while another still uses it (rank 0
        # writing the commit; a gloo rank that left early could abort at exit, seen in CI)
        distributed.finish(world)
        # a process that got no signal itself stops because another one did
        signum = stops.signum if stops.signum is not None else signal.SIGTERM
        return Interrupted(signum, at if world.main and at > start else None)

    method.train()
    if on_log is not None:
        on_log(start, tc.steps, None)
    it = iter(batches)
    try:
        stops.deferring = True  # from here a signal stops the loop at the end of a step
        for step, batch in enumerate(it, start=start):
            waited += time.perf_counter() - t_asked
            if stops.signum is not None and not world.active:  # arrived while the batch loaded: stop
                raise stop(step)  # before the step (under torchrun the step's reduction says when)
            lr = lr_at(step, preset.optim, tc.steps)
            for group in optimizer.param_groups:
                group["lr"] = preset.optim.lr if group.get("constant_lr") else lr
            if preset.optim.weight_decay_end is not None:
                wd = weight_decay_at(step, preset.optim, tc.steps)
                for i in decaying:
                    optimizer.param_groups[i]["weight_decay"] = wd
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            optimizer.zero_grad(set_to_none=True)
            # grad_accum micro-batches: all but the last go forward and backward at once (DDP: without
            # the gradient all-reduce); the last one's backward waits for the verdict on the step's loss
            parts = [batch] if micro == 1 else [dict(zip(batch, vs)) for vs in
                                                zip(*(v.chunk(micro) for v in batch.values()))]
            logged: dict[str, torch.Tensor] = {}  # the means over micro-batches, on the device
            for i, part in enumerate(parts):
                # a virtual process per micro-batch: rank 0's first draws what a single process draws,
                # and N processes draw what one process with grad_accum N draws
                vrank = (world.rank * micro + i,) if world.rank or i else ()
                if fsdp and micro > 1:  # as DDP's no_sync: reduce-scatter in the last micro-batch's backward
                    distributed.set_gradient_sync(method, i == micro - 1)
                torch.manual_seed(derive_seed(seed, step, 1, *vrank))
                gen = torch.Generator(dev).manual_seed(derive_seed(seed, step, 2, *vrank))
                with ddp.no_sync() if ddp is not None and i < micro - 1 else nullcontext():
                    with autocast:
                        out = model(part, step, gen, tc.steps)
                    loss = out["loss"] if micro == 1 else out["loss"] / micro
                    if i < micro - 1:
                        loss.backward()
                vals = {k: v.detach() if micro == 1 else v.detach() / micro for k, v in out.items()}
                logged = {k: logged[k] + v if k in logged else v for k, v in vals.items()}
            # the step's one host sync: the loss (finiteness, the same verdict on every process; the log),
            # how many processes were asked to stop (all stop after the same step, so that the last
            # commit is collective: FSDP's whole tensors, every process's own buffers) and the state
            # after the previous step (finiteness of the weights)
            loss_t, asked = distributed.mean_scalar_and_count(logged["loss"], stops.signum is not None, world)
            read = torch.stack([loss_t, asked] + ([] if health is None else [health.float()])).tolist()
            loss_value, agreed_stop = read[0], read[1] > 0
            if health is not None:
                check_health(read[2])
            if math.isfinite(loss_value):
                nonfinite = 0
                loss.backward()
                if tc.parallel == "allreduce":  # else DDP's hooks (FSDP's reduce-scatter) did, in backward
                    distributed.average_gradients(params, world)
                if preset.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(method.parameters(), preset.optim.grad_clip)
                optimizer.step()
                method.after_step(step, tc.steps)
                loss_sum, n_sum = loss_sum + loss_value, n_sum + 1
            else:  # skip the update; the step still counts, so data order stays tied to it
                optimizer.zero_grad(set_to_none=True)  # those of the first micro-batches
                nonfinite += 1
                if nonfinite >= tc.max_nonfinite:
                    raise TrainingDiverged(f"loss was non-finite for {nonfinite} consecutive steps "
                                           f"(last at step {step}); try a lower optim.lr")
            done = step + 1
            health, health_at = _state_max_abs(method, world if fsdp else None), done  # checked at the next sync or commit
            if n_sum and log is not None and (done % tc.log_every == 0 or done == tc.steps):
                now = time.time()
                sps = n_sum / max(now - t_last, 1e-9)
                row = {"step": done, "loss": loss_sum / n_sum, "lr": lr, **_read_logged(logged),
                       "steps_per_s": sps, "audio_h_per_s": sps * crop_h,
                       "data_wait": min(waited / max(now - t_last, 1e-9), 1.0), "time": now - t0}
                notes = method.log_warnings(row)
                if notes:  # a collapse signal past its threshold: on stderr and in the log row
                    row["warnings"] = notes
                    for note in notes:
                        warn(note)
                log.write(row)
                if on_log is not None:
                    on_log(done, tc.steps, row)
                loss_sum, n_sum, t_last, waited = 0.0, 0, now, 0.0
            if done % tc.ckpt_every == 0 or done == tc.steps:
                commit(done)
            if (agreed_stop if world.active else stops.signum is not None) and done < tc.steps:
                raise stop(done)
            t_asked = time.perf_counter()
    except Exception as e:
        if tc.compile and _compile_error(e):
            raise ConfigError(f"train.compile: torch.compile failed for method {preset.method.get('name')} "
                              f"({type(e).__name__}: {_first_line(e)}); set train.compile: false") from None
        raise
    finally:
        # the DDP wrapper (its reducer holds the process group) goes now, not with the traceback
        # of an exception in flight, after fit() has destroyed the group
        ddp = model = None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:  # now, not when the traceback is freed: workers ignore signals
            shutdown()
        if log is not None:
            log.close()
    if world.main and start == tc.steps and not fsdp:  # a finished run run again: nothing trained, and its
        # export may have been deleted or damaged since; the checkpoint verified, so write it from that
        # (under FSDP the weights are shards here: rerun the command without torchrun to rewrite it)
        path = run / "export" / "encoder.safetensors"
        if not checkpoint.export_is_current(path, start):
            checkpoint.export_encoder(path, method, preset, step=start)
            warn(f"{path}: missing or damaged; written again from checkpoint step {start}")
    return {"run": str(run), "steps": tc.steps, "start_step": start, "files": len(infos),
            "skipped": len(skipped), "time_s": time.time() - t0, "device": str(dev), "precision": precision,
            "world_size": world.size, "rank": world.rank}
