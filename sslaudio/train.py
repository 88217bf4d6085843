"""The one training loop, for every method (nanoGPT-style: the whole loop fits on one screen).

Learning rate and EMA momentum are pure functions of the step. Every random draw is seeded by
(seed, step): the batch (data.py), the augmentation / mask generator handed to the method, and the
global torch RNG (dropout). A run stopped at step k and resumed therefore ends with the same
weights as an uninterrupted one (bit-identical on the CPU).

Under torchrun every process runs this loop on its shard of the global batch (distributed.py);
rank 0 alone writes the run folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from sslaudio import checkpoint, distributed
from sslaudio.build import build_method
from sslaudio.atomic import atomic_text
from sslaudio.config import ConfigError, OptimConfig, Preset, dump_yaml
from sslaudio.data import CropDataset, DataError, loader, sample_for_stats, scan, validate


class TrainingDiverged(Exception):
    """Repeated non-finite losses (exit code 3)."""


class RunMismatch(Exception):
    """RUN holds checkpoints of a different configuration (exit code 2)."""


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to lr * min_lr_ratio (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix-style mixing; stable across runs and platforms)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def resolve_device(name: str) -> torch.device:
    """pick_device for a user-given --device: a bad name is a ConfigError (one line, exit code 2)."""
    try:
        return pick_device(name)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None


class _Log:
    """RUN/log.jsonl, one JSON object per logged step."""

    def __init__(self, path: Path, start_step: int):
        # drop lines past the checkpoint we resume from, so the log matches the weights
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            atomic_text(path, "".join(ln + "\n" for ln in keep))
        self.f = path.open("a")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def fit(preset: Preset, inputs: list[str], run_dir: str | Path, resume: bool = True, device: str = "auto",
        on_log: Callable[[int, int, dict | None], None] | None = None, warn=None) -> dict:
    """Train `preset` on the audio in `inputs` into `run_dir`. Returns a summary dict.

    on_log(start_step, total_steps, None) is called once before the first step, then
    on_log(done, total_steps, row) at every logged step with the row written to log.jsonl
    (rank 0 only under torchrun). The method is built (so its components are checked) before any
    data is scanned or any file written."""
    run = Path(run_dir)
    world = distributed.from_env()
    tc, seed = preset.train, preset.seed
    if tc.batch_size % world.size:
        raise ConfigError(f"train.batch_size {tc.batch_size} (the global batch) must be divisible by the "
                          f"{world.size} processes")
    dev = distributed.setup(world, device) if world.active else pick_device(device)
    if not world.main:
        warn, on_log = (lambda m: None), None
    torch.manual_seed(seed)
    method = build_method(preset).to(dev)
    last = checkpoint.latest(run) if resume else None
    if last is not None:
        saved = json.loads((last / "state.json").read_text())
        if saved.get("identity") != preset.identity():
            raise RunMismatch(f"{run} holds a run with another configuration (see {run}/config.yaml); "
                              f"use the same preset and --set values, --no-resume, or a new --out")
    if world.main:
        if last is None and run.exists() and not resume:
            shutil.rmtree(run / "ckpt", ignore_errors=True)
            (run / "log.jsonl").unlink(missing_ok=True)
        run.mkdir(parents=True, exist_ok=True)
        atomic_text(run / "config.yaml", dump_yaml(preset))

    infos, skipped = validate(scan(inputs), preset.data.min_seconds, warn)
    if not infos:
        raise DataError(f"no usable audio file in {' '.join(inputs)} ({len(skipped)} skipped)")
    dataset = CropDataset(infos, preset.data.sample_rate, preset.data.clip_seconds, preset.data.segments, seed)

    if world.active:
        method.gather_fn = distributed.gather_rows  # negatives / batch statistics of every process
        if dev.type == "cuda":  # batch statistics over the global batch, as one big-batch process
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(method.param_groups(preset.optim.weight_decay), lr=preset.optim.lr,
                                  betas=preset.optim.betas, eps=preset.optim.eps)
    start = 0
    if last is not None:
        model_t, optim_t, optim_meta, state = checkpoint.load_step(last)
        method.load_state_dict(model_t)
        checkpoint.load_optimizer(optimizer, optim_t, optim_meta)
        start = state["step"]
    else:
        method.prepare(sample_for_stats(dataset, preset.data.norm_samples, seed).to(dev))

    precision = tc.precision if tc.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    workers = min(preset.data.num_workers, os.cpu_count() or 1)
    batches = loader(dataset, tc.batch_size, seed, start, tc.steps, workers, world.shard(tc.batch_size))
    log = _Log(run / "log.jsonl", start) if world.main else None
    crop_h = tc.batch_size * preset.data.segments * preset.data.clip_seconds / 3600
    nonfinite, loss_sum, n_sum, t0, t_last, step = 0, 0.0, 0, time.time(), time.time(), start
    state = {"skipped_files": len(skipped), "files": len(infos), "world_size": world.size}
    rank = (world.rank,) if world.rank else ()  # rank 0 draws what a single process draws

    def commit(at: int, check: bool = True) -> None:
        if check:  # not on an interrupt: the other processes may be gone
            distributed.check_in_sync(params, world)
        if world.main:
            checkpoint.save(run, at, method, optimizer, preset, {**state, "nonfinite": nonfinite}, tc.keep_last)
            checkpoint.export_encoder(run / "export" / "encoder.safetensors", method, preset)

    method.train()
    if on_log is not None:
        on_log(start, tc.steps, None)
    try:
        for step, batch in enumerate(batches, start=start):
            lr = lr_at(step, preset.optim, tc.steps)
            for group in optimizer.param_groups:
                group["lr"] = preset.optim.lr if group.get("constant_lr") else lr
            torch.manual_seed(derive_seed(seed, step, 1, *rank))
            gen = torch.Generator(dev).manual_seed(derive_seed(seed, step, 2, *rank))
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            with autocast:
                out = method(batch, step, gen, tc.steps)
            loss = out["loss"]
            optimizer.zero_grad(set_to_none=True)
            # the step's one host sync: finiteness (the same verdict on every process) and the log
            loss_value = float(distributed.mean_scalar(loss.detach(), world))
            if math.isfinite(loss_value):
                nonfinite = 0
                loss.backward()
                distributed.average_gradients(params, world)
                if preset.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(method.parameters(), preset.optim.grad_clip)
                optimizer.step()
                method.after_step(step, tc.steps)
                loss_sum, n_sum = loss_sum + loss_value, n_sum + 1
            else:  # skip the update; the step still counts, so data order stays tied to it
                nonfinite += 1
                if nonfinite >= tc.max_nonfinite:
                    raise TrainingDiverged(f"loss was non-finite for {nonfinite} consecutive steps "
                                           f"(last at step {step}); try a lower optim.lr")
            done = step + 1
            if n_sum and log is not None and (done % tc.log_every == 0 or done == tc.steps):
                now = time.time()
                sps = n_sum / max(now - t_last, 1e-9)
                row = {"step": done, "loss": loss_sum / n_sum, "lr": lr,
                       **{k: float(v.detach()) for k, v in out.items() if k != "loss"},
                       "steps_per_s": sps, "audio_h_per_s": sps * crop_h, "time": now - t0}
                log.write(row)
                if on_log is not None:
                    on_log(done, tc.steps, row)
                loss_sum, n_sum, t_last = 0.0, 0, now
            if done % tc.ckpt_every == 0 or done == tc.steps:
                commit(done)
    except KeyboardInterrupt:
        if step > start:
            commit(step, check=False)  # the last fully finished step, so the run resumes from there
        raise
    finally:
        if log is not None:
            log.close()
        distributed.teardown(world)
    return {"run": str(run), "steps": tc.steps, "start_step": start, "files": len(infos),
            "skipped": len(skipped), "time_s": time.time() - t0, "device": str(dev), "precision": precision,
            "world_size": world.size, "rank": world.rank}

