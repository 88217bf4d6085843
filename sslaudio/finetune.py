"""Fine-tuning: the encoder trained together with the probe head (`sslaudio probe --finetune`).

As ATST-SED's fine-tuning (Shao et al., "Fine-tune the pretrained ATST model for sound event
detection", ICASSP 2024; github.com/Audio-WestlakeU/ATST-SED, train/train_stage2.py and
train/confs/stage2.yaml): the head starts from a frozen stage (ATST-SED's stage 1 trains its CRNN
head on the frozen encoder; here the head is the frozen linear probe's chosen weights and
standardisation, the LP-FT recipe of Kumar et al., ICLR 2022), then encoder and head train
together with Adam, the encoder at a lower learning rate than the head (ATST-SED: 2e-4 against
2e-3) and optionally lower still layer by layer from the top (ATST-SED: x0.5 per block). The
metric the frozen probe selects on (valid accuracy, or mAP for multi-label and SED frames) is
measured before training (epoch 0: the frozen head) and after every epoch; training stops after
`patience` epochs without improvement and the best epoch's weights are the ones reported. SED may
add a bidirectional GRU over the grid embeddings (ATST-SED's RNN head; here a residual branch whose
output layer starts at zero, so training still starts from the frozen probe) and gets the per-class
median filter of probe.event_metrics.

Clip tasks train on the clip embedding (the encoder's own pooling), SED on the frame embeddings
averaged onto the probe's grid (probe.grid_matrix: the frozen probe's grid, differentiably).
Training batches are padded (with their lengths); evaluation batches hold files of equal length,
as extraction does, so epoch 0 scores what the frozen probe scored. Files are held in memory, up
to MAX_SECONDS each. Nothing is written unless `save_finetuned` is called (`probe --save DIR`).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from sslaudio.atomic import atomic_write
from sslaudio.audio import AudioError, load
from sslaudio.checkpoint import export_encoder
from sslaudio.inference import EncoderBundle
from sslaudio.probe import (
    Events,
    ProbeError,
    ProbeFit,
    event_metrics,
    grid_matrix,
    report_metrics,
    valid_score,
)

MAX_SECONDS = 30.0  # longer files: extraction chunks them; fine-tuning would backpropagate through the whole file
HEAD_FORMAT = "sslaudio-probe-head-1"
SD_FLOOR = 0.1  # of the median std over dimensions (see Head)


@dataclass
class FinetuneConfig:
    """The fine-tuning budget; every value is checked here (one-line ProbeError naming the option)."""
    epochs: int = 10
    lr: float = 1e-3  # the head's learning rate (Adam)
    encoder_lr_ratio: float = 0.1  # encoder lr = lr * ratio (ATST-SED: 2e-4 / 2e-3)
    layer_decay: float = 1.0  # encoder unit k of L: its lr times layer_decay ** (L - 1 - k); 1 = none
    patience: int = 3  # epochs without a better valid score before stopping
    batch_size: int = 8
    rnn_head: bool = False  # SED: a bidirectional GRU beside the linear head
    rnn_hidden: int = 64

    def __post_init__(self):
        def bad(option: str, rule: str, value) -> ProbeError:
            return ProbeError(f"{option} must be {rule}, found {value}")

        for option, value in (("--ft-epochs", self.epochs), ("--ft-patience", self.patience),
                              ("--ft-batch-size", self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(option, "an integer >= 1", value)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise bad("--ft-lr", "a finite number > 0", self.lr)
        if not (isinstance(self.encoder_lr_ratio, (int, float)) and 0 < self.encoder_lr_ratio <= 1):
            raise bad("--ft-encoder-lr-ratio", "in (0, 1] (the encoder learns slower than the head)",
                      self.encoder_lr_ratio)
        if not (isinstance(self.layer_decay, (int, float)) and 0 < self.layer_decay <= 1):
            raise bad("--ft-layer-decay", "in (0, 1] (1: no decay)", self.layer_decay)
        if self.rnn_hidden < 1:
            raise bad("rnn_hidden", "an integer >= 1", self.rnn_hidden)


@dataclass
class Task:
    """What to fine-tune on: the probed files, their targets and (SED) reference events."""
    paths: list[str]
    targets: list[np.ndarray]  # per file: () class index, (C,) 0/1, or SED (n_grid_i, C) 0/1
    kind: Literal["multiclass", "multilabel", "sed"]
    classes: list[str]
    events: list[Events] | None = None  # SED: reference events per file (class indices)
    hop: float = 0.1  # SED grid (seconds)
    median: int | None = None  # SED: median window for every class; None: per class, picked on valid
    audio: list[Tensor] = field(default_factory=list, repr=False)  # filled by load_audio


class Head(nn.Module):
    """(x - mu) / sd -> linear, initialised from the frozen probe; with `rnn_hidden`, plus a
    bidirectional GRU over the time axis whose zero-initialised output layer is added.

    sd is the probe's, floored at SD_FLOOR times its median over dimensions: a dimension that was
    (nearly) constant on train (a ReLU unit dead on every training file, common at random init)
    would otherwise turn the first change fine-tuning makes to it into an enormous input."""

    def __init__(self, fit: ProbeFit, rnn_hidden: int | None = None):
        super().__init__()
        d, c = fit.W.shape
        sd = np.maximum(fit.sd, SD_FLOOR * np.median(fit.sd))
        self.register_buffer("mu", torch.as_tensor(fit.mu, dtype=torch.float32))
        self.register_buffer("sd", torch.as_tensor(sd, dtype=torch.float32))
        self.linear = nn.Linear(d, c)
        with torch.no_grad():
            self.linear.weight.copy_(fit.W.T)
            self.linear.bias.copy_(fit.b)
        self.rnn = self.rnn_out = None
        if rnn_hidden:
            self.rnn = nn.GRU(d, rnn_hidden, batch_first=True, bidirectional=True)
            self.rnn_out = nn.Linear(2 * rnn_hidden, c)
            nn.init.zeros_(self.rnn_out.weight)
            nn.init.zeros_(self.rnn_out.bias)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, D) -> (B, C), or (B, n, D) with valid lengths (B,) -> (B, n, C)."""
        z = (x.float() - self.mu) / self.sd
        out = self.linear(z)
        if self.rnn is not None:
            packed = nn.utils.rnn.pack_padded_sequence(z, lengths.cpu(), batch_first=True, enforce_sorted=False)
            h, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=z.shape[1])
            out = out + self.rnn_out(h)
        return out


class Finetuned(nn.Module):
    """Frontend + encoder + head: waveforms (B, S) -> clip logits (B, C), or with grid matrices
    (B, n, T) grid logits (B, n, C)."""

    def __init__(self, bundle: EncoderBundle, head: Head):
        super().__init__()
        self.bundle, self.head = bundle, head

    def forward(self, audio: Tensor, lengths: Tensor | None = None,
                to_grid: Callable[[Tensor, int], tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor | None]:
        """-> (logits, grid lengths or None). `to_grid(frame_lengths, T)` gives the (B, n, T)
        matrices that average each file's valid frames onto its grid, and the grid lengths (B,)."""
        clip, frames, frame_lengths = self.bundle.embed(audio, lengths)
        if to_grid is None:
            return self.head(clip), None
        grids, grid_lengths = to_grid(frame_lengths.cpu(), frames.shape[1])
        return self.head(torch.bmm(grids, frames.float()), grid_lengths), grid_lengths  # (B, n, T) @ (B, T, D)


class EarlyStopping:
    """Keeps a copy of the weights at the best (highest) valid score; `update` says when
    `patience` epochs have passed without a better one. Ties keep the earlier epoch."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_epoch, self.state = patience, -math.inf, -1, None

    def update(self, epoch: int, score: float, model: nn.Module) -> bool:
        if score > self.best:
            self.best, self.best_epoch = score, epoch
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return epoch - self.best_epoch >= self.patience


def train_mode(model: Finetuned) -> None:
    """The head in training mode, the frontend + encoder in eval mode: no dropout or LayerDrop
    (ATST-SED fine-tunes with its encoder dropout at 0) and BatchNorm on its running statistics
    (fine-tuning batches are small, and the frozen head was fitted on embeddings normalised by
    them), so the encoder computes the same function in training and evaluation."""
    model.train()
    model.bundle.eval()


def encoder_param_groups(module: nn.Module, lr: float, decay: float) -> list[dict]:
    """The trainable parameters of `module` (frontend + encoder) in units, input to output: a
    unit is everything under a name up to its first numeric index (`blocks.blocks.3`,
    `features.4`) or else its top-level name, in registration order; unit k of L gets
    lr * decay ** (L - 1 - k), so the last unit learns at lr (BEiT / ATST-SED layer decay)."""
    units: dict[str, list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            parts = name.split(".")
            cut = next((i + 1 for i, x in enumerate(parts) if x.isdigit()), 2)
            units.setdefault(".".join(parts[:cut]), []).append(p)
    n = len(units)
    return [{"params": ps, "lr": lr * decay ** (n - 1 - k)} for k, ps in enumerate(units.values())]


def load_audio(task: Task, sample_rate: int) -> None:
    """Decode every file of the task once (they were all embedded by the frozen probe)."""
    task.audio = []
    for path in task.paths:
        try:
            a = load(path, sample_rate)
        except AudioError as e:
            raise ProbeError(f"{path}: {e}") from None
        if a.shape[0] > MAX_SECONDS * sample_rate:
            raise ProbeError(f"{path}: {a.shape[0] / sample_rate:.1f} s; --finetune takes files up to "
                             f"{MAX_SECONDS:g} s (cut them, or probe without --finetune)")
        task.audio.append(a)


class _Batches:
    """Padded batches of a task's files with their targets (and SED grid matrices)."""

    def __init__(self, task: Task, encoder, device: torch.device):
        self.task, self.encoder, self.device = task, encoder, device
        self.sr = encoder.sample_rate
        self._grids: dict[tuple[int, int], np.ndarray] = {}

    def grid(self, n_samples: int, n_frames: int) -> np.ndarray:
        key = (n_samples, n_frames)
        if key not in self._grids:  # files of one length share their matrix
            times = self.encoder.frame_times(n_frames).numpy()
            self._grids[key] = grid_matrix(times, n_samples / self.sr, self.task.hop)
        return self._grids[key]

    def audio(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        waves = [self.task.audio[i] for i in idx]
        lengths = torch.tensor([w.shape[0] for w in waves])
        return nn.utils.rnn.pad_sequence(waves, batch_first=True).to(self.device), lengths.to(self.device)

    def grids(self, idx: np.ndarray, frame_lengths: Tensor, n_frames: int) -> tuple[Tensor, Tensor]:
        """(B, n_max, T) grid matrices of the batch and its grid lengths (B,)."""
        mats = [self.grid(self.task.audio[i].shape[0], int(t)) for i, t in zip(idx, frame_lengths.tolist())]
        out = torch.zeros(len(mats), max(m.shape[0] for m in mats), n_frames)
        for j, m in enumerate(mats):
            out[j, : m.shape[0], : m.shape[1]] = torch.from_numpy(m)
        return out.to(self.device), torch.tensor([m.shape[0] for m in mats])

    def targets(self, idx: np.ndarray, n_max: int | None = None) -> Tensor:
        ys = [self.task.targets[i] for i in idx]
        if self.task.kind == "multiclass":
            return torch.as_tensor(np.array(ys), dtype=torch.long, device=self.device)
        if self.task.kind == "multilabel":
            return torch.as_tensor(np.stack(ys), dtype=torch.float32, device=self.device)
        out = np.zeros((len(ys), n_max, len(self.task.classes)), np.float32)
        for j, y in enumerate(ys):
            out[j, : len(y)] = y
        return torch.from_numpy(out).to(self.device)


def _forward(model: Finetuned, data: _Batches, idx: np.ndarray, padded: bool = True) -> tuple[Tensor, Tensor | None]:
    """Logits of the files idx: (B, C), or SED (B, n_max, C) with grid lengths (B,). Unpadded
    (files of one length) the encoder sees no lengths, exactly as extraction runs it."""
    audio, lengths = data.audio(idx)
    to_grid = None
    if data.task.kind == "sed":
        def to_grid(frame_lengths: Tensor, n_frames: int) -> tuple[Tensor, Tensor]:
            return data.grids(idx, frame_lengths, n_frames)
    return model(audio, lengths if padded else None, to_grid)


def _loss(logits: Tensor, y: Tensor, kind: str, grid_lengths: Tensor | None) -> Tensor:
    logits = logits.float()
    if kind == "multiclass":
        return F.cross_entropy(logits, y)
    if kind == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y)
    valid = (torch.arange(logits.shape[1])[None] < grid_lengths[:, None]).to(logits.device)  # (B, n)
    per = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(-1)  # (B, n)
    return (per * valid).sum() / valid.sum()


@torch.inference_mode()
def predict(model: Finetuned, data: _Batches, idx: np.ndarray, batch_size: int, autocast) -> list[np.ndarray]:
    """Per-file logits (C,) or (n_grid_i, C), in eval mode; files of equal length batched together."""
    model.eval()
    lengths = np.array([data.task.audio[i].shape[0] for i in idx])
    order = np.argsort(lengths, kind="stable")
    out: list[np.ndarray | None] = [None] * len(idx)
    for n in np.unique(lengths):
        same = order[lengths[order] == n]
        for k in range(0, len(same), batch_size):
            pos = same[k:k + batch_size]
            with autocast:
                logits, grid_lengths = _forward(model, data, idx[pos], padded=False)
            logits = logits.float().cpu().numpy()
            for j, p in enumerate(pos):
                out[p] = logits[j] if grid_lengths is None else logits[j, : int(grid_lengths[j])]
    return out


def _scores(task: Task, logits: list[np.ndarray], idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stacked logits and targets of the files idx (SED: all their grid frames)."""
    if task.kind == "sed":
        return np.concatenate(logits), np.concatenate([task.targets[i] for i in idx])
    return np.stack(logits), np.stack([task.targets[i] for i in idx])


def finetune(bundle: EncoderBundle, task: Task, fit: ProbeFit, cfg: FinetuneConfig, device: torch.device,
             seed: int = 0, eval_batch_size: int = 16,
             on_epoch: Callable[[int, int, float, float], None] | None = None) -> tuple[dict, Finetuned]:
    """Fine-tune a copy of `bundle` with a head started from the frozen probe's `fit` on the
    task's train split, early-stopped on valid; report test with the frozen probe's metrics.
    `on_epoch(epoch, epochs, train_loss, valid_score)` hears of each epoch. Returns (metrics,
    the fine-tuned model at its best epoch). The bundle itself is left as it was."""
    if cfg.rnn_head and task.kind != "sed":
        raise ProbeError("--rnn-head is for sound event detection (a labels file with onset,offset columns)")
    t0 = time.time()
    device = torch.device(device)
    if not task.audio:
        load_audio(task, bundle.sample_rate)
    tr, va, te = fit.train, fit.valid, fit.test
    multilabel = task.kind != "multiclass"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    history, losses, stopped = [], [], None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the GRU's initialisation; the global generators are restored afterwards
        model = Finetuned(copy.deepcopy(bundle), Head(fit, cfg.rnn_hidden if cfg.rnn_head else None)).to(device)
        data = _Batches(task, model.bundle.encoder, device)
        opt = torch.optim.Adam([{"params": list(model.head.parameters()), "lr": cfg.lr}]
                               + encoder_param_groups(model.bundle, cfg.lr * cfg.encoder_lr_ratio, cfg.layer_decay))
        stop = EarlyStopping(cfg.patience)

        def valid() -> float:
            return valid_score(*_scores(task, predict(model, data, va, eval_batch_size, autocast), va), multilabel)

        history.append(valid())
        stop.update(0, history[-1], model)
        g = torch.Generator().manual_seed(seed)
        for epoch in range(1, cfg.epochs + 1):
            train_mode(model)
            perm = tr[torch.randperm(len(tr), generator=g).numpy()]
            total = 0.0
            for idx in np.array_split(perm, math.ceil(len(perm) / cfg.batch_size)):  # sizes differ by <= 1
                with autocast:
                    logits, grid_lengths = _forward(model, data, idx)
                loss = _loss(logits, data.targets(idx, logits.shape[1] if logits.ndim == 3 else None), task.kind,
                             grid_lengths)
                if not torch.isfinite(loss):
                    stopped = f"non-finite training loss in epoch {epoch}; try a lower --ft-lr"
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            if stopped:
                break
            losses.append(total / len(tr))
            history.append(valid())
            if on_epoch is not None:
                on_epoch(epoch, cfg.epochs, losses[-1], history[-1])
            if stop.update(epoch, history[-1], model):
                break
    model.load_state_dict(stop.state)
    s_va, y_va = _scores(task, logits_va := predict(model, data, va, eval_batch_size, autocast), va)
    s_te, y_te = _scores(task, logits_te := predict(model, data, te, eval_batch_size, autocast), te)
    res = report_metrics(s_va, y_va, s_te, y_te, len(task.classes), multilabel)
    if task.kind == "sed" and task.events is not None:
        probs_va, probs_te = ([1 / (1 + np.exp(-x)) for x in logits] for logits in (logits_va, logits_te))
        res.update(event_metrics(probs_va, [task.events[i] for i in va], probs_te, [task.events[i] for i in te],
                                 [task.audio[i].shape[0] / bundle.sample_rate for i in te], res["threshold"], task.hop,
                                 len(task.classes), task.median))
    res.update(valid=stop.best, epochs=stop.best_epoch, epochs_run=len(history) - 1,
               valid_history=[round(float(v), 6) for v in history], train_loss=[round(v, 6) for v in losses],
               lr=cfg.lr, encoder_lr=cfg.lr * cfg.encoder_lr_ratio, layer_decay=cfg.layer_decay,
               batch_size=cfg.batch_size, patience=cfg.patience, head="linear+bigru" if cfg.rnn_head else "linear",
               time_s=round(time.time() - t0, 1))
    if stopped:
        res["stopped"] = stopped
    return res, model


def save_finetuned(out_dir: str | Path, model: Finetuned, task: Task, metrics: dict) -> list[Path]:
    """Write the fine-tuned frontend + encoder as an encoder file (`OUT/encoder.safetensors`,
    accepted wherever a CKPT is) and the head (`OUT/head.safetensors`, classes, task and
    post-processing in its metadata), each atomically; nothing is pickled."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundle = model.bundle
    export_encoder(out / "encoder.safetensors", SimpleNamespace(frontend=bundle.frontend,
                                                                inference_encoder=lambda: bundle.encoder),
                   bundle.preset)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.head.state_dict().items()}
    meta = {"format": HEAD_FORMAT, "task": task.kind, "classes": json.dumps(task.classes),
            "layer": json.dumps(bundle.layer), "head": metrics.get("head", "linear")}
    if task.kind == "sed":
        meta.update(frame_hop=repr(task.hop), median_windows=json.dumps(metrics.get("median_windows")))
    if "threshold" in metrics:
        meta["threshold"] = repr(metrics["threshold"])
    atomic_write(out / "head.safetensors", lambda t: save_file(tensors, t, metadata=meta))
    return [out / "encoder.safetensors", out / "head.safetensors"]
