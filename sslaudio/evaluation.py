"""Probe a checkpoint end to end: load the encoder, embed the labeled files, run the probes.

Library code (the CLI's `probe` and `demo`, benchmarks/devbench.py): failures raise ProbeError,
CheckpointError, ConfigError or DataError; skipped audio files go to the `on_skip(path, reason)`
callback. Clip tasks (path,label[,split]) get the linear / kNN probes of probe.evaluate; a labels
file with onset,offset columns is sound event detection, a frame-level probe on frame embeddings
with the DCASE segment- and event-based F1 beside the frame metrics. With a FinetuneConfig, the
encoder is also fine-tuned with the probe head (sslaudio.finetune), starting from the frozen
probe's choice, and its metrics go under `finetune` beside the frozen ones.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sslaudio.features import embed_files
from sslaudio.finetune import FinetuneConfig, Task, finetune, save_finetuned
from sslaudio.inference import load_encoder
from sslaudio.probe import (
    ProbeError,
    check_leakage,
    encode_labels,
    evaluate,
    evaluate_events,
    frame_targets,
    is_event_csv,
    read_events,
    read_labels,
    to_grid,
)
from sslaudio.train import resolve_device

FINETUNE_NEEDS_SPLITS = "--finetune needs train/valid/test splits: add a split column to {}"


def probe_checkpoint(ckpt: str, labels: str | Path, batch_size: int = 16, device: str = "auto", seed: int = 0,
                     layer: int | None = None, files: str | Path | None = None, frame_hop: float = 0.1,
                     on_skip: Callable[[str, str], None] | None = None, median: int | None = None,
                     finetune_cfg: FinetuneConfig | None = None, save: str | Path | None = None,
                     on_epoch: Callable[[int, int, float, float], None] | None = None,
                     on_warn: Callable[[str], None] | None = None) -> dict:
    """Probe the encoder of `ckpt` (run folder, step folder, encoder file or random:PRESET) on `labels`.

    Returns the metrics of probe.evaluate (or evaluate_events) with checkpoint, labels, skipped
    (the number of unusable audio files) and layer added. `median`: SED median filter window (odd,
    grid frames) for every class; None picks one per class on valid. With `finetune_cfg`, also
    `finetune`: the fine-tuned encoder's metrics under the same names (`on_epoch` hears of its
    epochs); `save` (a folder) then receives its encoder and head, else nothing is written.

    Leaks in a clip labels file (probe.check_leakage: a row twice, a file in two splits) go to
    `on_warn` as one line each (default: `warning: ...` on stderr); a file with two label sets is a
    ProbeError."""
    warn = on_warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    dev = resolve_device(device)
    events = is_event_csv(labels)
    if median is not None and not events:
        raise ProbeError("--median-filter is for sound event detection (a labels file with onset,offset columns)")
    if save is not None and finetune_cfg is None:
        raise ProbeError("--save writes a fine-tuned encoder: it needs --finetune")
    if finetune_cfg is not None and finetune_cfg.rnn_head and not events:
        raise ProbeError("--rnn-head is for sound event detection (a labels file with onset,offset columns)")
    rows = None
    if not events:
        rows, leaks = check_leakage(read_labels(labels), labels)
        for message in leaks:
            warn(message)
    if finetune_cfg is not None and rows is not None and rows[0].split is None:
        raise ProbeError(FINETUNE_NEEDS_SPLITS.format(labels))
    bundle = load_encoder(ckpt).set_layer(layer)
    skipped = []

    def skip(p: str, r: str) -> None:
        skipped.append(p)
        if on_skip is not None:
            on_skip(p, r)

    if events:
        return _probe_events(bundle, labels, files, frame_hop, dev, batch_size, seed, skip, skipped, median,
                             finetune_cfg, save, on_epoch, warn) | {"checkpoint": ckpt, "layer": layer}

    emb = {e.path: e.clip for e in embed_files(bundle, [(r.path, r.rel) for r in rows], dev, False, batch_size,
                                               on_skip=skip)}
    kept = [r for r in rows if r.path in emb]
    if len(kept) < 10:
        raise ProbeError(f"only {len(kept)} usable files in {labels} ({len(skipped)} skipped)", code=4)
    X = np.stack([emb[r.path] for r in kept])
    res = evaluate(X, [r.labels for r in kept], [r.split for r in kept], seed, return_fit=finetune_cfg is not None)
    if finetune_cfg is not None:
        res, fit = res
        classes, y, multilabel = encode_labels([r.labels for r in kept])
        task = Task([r.path for r in kept], list(y), "multilabel" if multilabel else "multiclass", classes)
        res["finetune"] = _finetune(bundle, task, fit, finetune_cfg, dev, seed, batch_size, save, on_epoch)
    res.update(checkpoint=ckpt, labels=str(labels), skipped=len(skipped), layer=layer)
    return res


def _finetune(bundle, task: Task, fit, cfg: FinetuneConfig, dev, seed: int, batch_size: int, save, on_epoch) -> dict:
    metrics, model = finetune(bundle, task, fit, cfg, dev, seed, batch_size, on_epoch)
    if save is not None:
        metrics["saved"] = [str(p) for p in save_finetuned(save, model, task, metrics)]
    return metrics


def _probe_events(bundle, labels: str | Path, files: str | Path | None, hop: float, dev, batch_size: int,
                  seed: int, skip: Callable[[str, str], None], skipped: list, median: int | None,
                  finetune_cfg: FinetuneConfig | None, save, on_epoch, warn: Callable[[str], None]) -> dict:
    """The sound event detection probe of `bundle` on the strong labels in `labels` (and `files`).

    `skip` is handed to embed_files; `skipped` is the list it fills, for the counts."""
    clips = read_events(labels, files, warn)
    if finetune_cfg is not None and clips[0].split is None:
        raise ProbeError(FINETUNE_NEEDS_SPLITS.format(files or labels))
    classes = sorted({lab for f in clips for _, _, lab in f.events})
    if len(classes) < 2:
        raise ProbeError("need at least two event classes to probe", code=4)
    cidx = {c: i for i, c in enumerate(classes)}
    emb = {e.path: e for e in embed_files(bundle, [(f.path, f.rel) for f in clips], dev, True, batch_size,
                                          on_skip=skip)}
    kept = [f for f in clips if f.path in emb]
    if len(kept) < 5:
        raise ProbeError(f"only {len(kept)} usable files in {labels} ({len(skipped)} skipped)", code=4)
    grids = [to_grid(emb[f.path].frames, emb[f.path].times, emb[f.path].seconds, hop) for f in kept]
    targets = [frame_targets(f.events, len(g), hop, cidx) for f, g in zip(kept, grids)]
    refs = [[(on, off, cidx[lab]) for on, off, lab in f.events] for f in kept]
    res = evaluate_events(grids, targets, [f.split for f in kept], classes, seed, events=refs,
                          durations=[emb[f.path].seconds for f in kept], hop=hop, median=median,
                          return_fit=finetune_cfg is not None)
    if finetune_cfg is not None:
        res, fit = res
        task = Task([f.path for f in kept], targets, "sed", classes, events=refs, hop=hop, median=median)
        res["finetune"] = _finetune(bundle, task, fit, finetune_cfg, dev, seed, batch_size, save, on_epoch)
    res.update(labels=str(labels), skipped=len(skipped), frame_hop=hop, classes=classes)
    return res
