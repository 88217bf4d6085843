"""Probe a checkpoint end to end: load the encoder, embed the labeled files, run the probes.

Library code (the CLI's `probe` and `demo`, benchmarks/devbench.py): failures raise ProbeError,
CheckpointError, ConfigError or DataError; skipped audio files go to the `on_skip(path, reason)`
callback. Clip tasks (path,label[,split]) get the linear / kNN probes of probe.evaluate; a labels
file with onset,offset columns is sound event detection, a frame-level probe on frame embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from sslaudio.inference import load_encoder
from sslaudio.features import embed_files
from sslaudio.probe import (ProbeError, evaluate, evaluate_events, frame_targets, is_event_csv, read_events,
                            read_labels, to_grid)
from sslaudio.train import resolve_device


def probe_checkpoint(ckpt: str, labels: str | Path, batch_size: int = 16, device: str = "auto", seed: int = 0,
                     layer: int | None = None, files: str | Path | None = None, frame_hop: float = 0.1,
                     on_skip: Callable[[str, str], None] | None = None) -> dict:
    """Probe the encoder of `ckpt` (run folder, step folder, encoder file or random:PRESET) on `labels`.

    Returns the metrics of probe.evaluate (or evaluate_events) with checkpoint, labels, skipped
    (the number of unusable audio files) and layer added."""
    dev = resolve_device(device)
    events = is_event_csv(labels)
    rows = None if events else read_labels(labels)
    bundle = load_encoder(ckpt).set_layer(layer)
    skipped = []

    def skip(p: str, r: str) -> None:
        skipped.append(p)
        if on_skip is not None:
            on_skip(p, r)

    if events:
        return _probe_events(bundle, labels, files, frame_hop, dev, batch_size, seed, skip, skipped) | \
            {"checkpoint": ckpt, "layer": layer}

    emb = {e.path: e.clip for e in embed_files(bundle, [(r.path, r.rel) for r in rows], dev, False, batch_size,
                                               on_skip=skip)}
    kept = [r for r in rows if r.path in emb]
    if len(kept) < 10:
        raise ProbeError(f"only {len(kept)} usable files in {labels} ({len(skipped)} skipped)", code=4)
    X = np.stack([emb[r.path] for r in kept])
    res = evaluate(X, [r.labels for r in kept], [r.split for r in kept], seed)
    res.update(checkpoint=ckpt, labels=str(labels), skipped=len(skipped), layer=layer)
    return res


def _probe_events(bundle, labels: str | Path, files: str | Path | None, hop: float, dev, batch_size: int,
                  seed: int, skip: Callable[[str, str], None], skipped: list) -> dict:
    """The sound event detection probe of `bundle` on the strong labels in `labels` (and `files`).

    `skip` is handed to embed_files; `skipped` is the list it fills, for the counts."""
    clips = read_events(labels, files)
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
    res = evaluate_events(grids, targets, [f.split for f in kept], classes, seed)
    res.update(labels=str(labels), skipped=len(skipped), frame_hop=hop, classes=classes)
    return res
