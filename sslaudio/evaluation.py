"""Probe a checkpoint end to end: load the encoder, embed the labeled files, run the probes.

Library code (the CLI's `probe` and `demo`, benchmarks/devbench.py): failures raise ProbeError,
CheckpointError, ConfigError or DataError; skipped audio files go to the `on_skip(path, reason)`
callback. Clip tasks (path,label[,split]) get the linear / kNN probes of probe.evaluate; a labels
file with onset,offset columns is sound event detection, a frame-level probe on frame embeddings
with the DCASE segment- and event-based F1 beside the frame metrics. With a FinetuneConfig, the
encoder is also fine-tuned with the probe head (sslaudio.finetune), starting from the frozen
probe's choice, and its metrics go under `finetune` beside the frozen ones. probe_suite runs
several checkpoints on the tasks of a suite YAML through a feature cache (see "probe suites").
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from sslaudio.atomic import atomic_write
from sslaudio.features import Embedding, embed_files, encoder_identity
from sslaudio.finetune import FinetuneConfig, Task, finetune, save_finetuned
from sslaudio.inference import load_encoder
from sslaudio.probe import (
    ProbeError,
    check_classes,
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


def check_frame_hop(hop, what: str) -> None:
    """The SED frame hop of a single probe and of a suite task: seconds in [0.01, 10] (NaN and
    infinity fail the comparison too); a ProbeError naming `what` otherwise."""
    if isinstance(hop, bool) or not isinstance(hop, (int, float)) or not 0.01 <= hop <= 10:
        raise ProbeError(f"{what} must be a number of seconds in [0.01, 10], found {hop!r}")


def probe_checkpoint(ckpt: str, labels: str | Path, batch_size: int = 16, device: str = "auto", seed: int = 0,
                     layer: int | str | None = None, files: str | Path | None = None, frame_hop: float = 0.1,
                     on_skip: Callable[[str, str], None] | None = None, median: int | None = None,
                     finetune_cfg: FinetuneConfig | None = None, save: str | Path | None = None,
                     on_epoch: Callable[[int, int, float, float], None] | None = None,
                     on_warn: Callable[[str], None] | None = None, mlp: bool = False,
                     confusion: bool = False, embed: Callable | None = None, pool: str | None = None) -> dict:
    """Probe the encoder of `ckpt` (run folder, step folder, encoder file or random:PRESET) on `labels`.

    Returns the metrics of probe.evaluate (or evaluate_events) with checkpoint, labels, skipped
    (the number of unusable audio files) and layer added. `median`: SED median filter window (odd,
    grid frames) for every class; None picks one per class on valid. With `finetune_cfg`, also
    `finetune`: the fine-tuned encoder's metrics under the same names (`on_epoch` hears of its
    epochs); `save` (a folder) then receives its encoder and head, else nothing is written.

    Leaks in a clip labels file (probe.check_leakage: a row twice, a file in two splits) and
    classes the probe cannot learn (probe.check_classes: none in train, one or two files in all)
    go to `on_warn` as one line each (default: `warning: ...` on stderr); a file with two label sets is a
    ProbeError.

    `mlp` adds the MLP probe (clip tasks: `mlp_*` metrics), `confusion` the linear probe's test
    confusion matrix (single-label clip tasks), `pool` (a POOLS name) the clip statistics in place of
    the encoder's own (clip tasks; fine-tuning pools the same way). `embed(bundle, items, frames, on_skip)` replaces
    embed_files (probe suites: the feature cache) and yields features.Embedding."""
    warn = on_warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    dev = resolve_device(device)
    events = is_event_csv(labels)
    if median is not None and not events:
        raise ProbeError("--median-filter is for sound event detection (a labels file with onset,offset columns)")
    if save is not None and finetune_cfg is None:
        raise ProbeError("--save writes a fine-tuned encoder: it needs --finetune")
    if finetune_cfg is not None and finetune_cfg.rnn_head and not events:
        raise ProbeError("--rnn-head is for sound event detection (a labels file with onset,offset columns)")
    if events:
        check_frame_hop(frame_hop, "--frame-hop")
    if mlp and events:
        raise ProbeError("--mlp is for clip tasks (path,label[,split]), not sound event detection")
    if pool is not None and events:
        raise ProbeError("--pool is for clip tasks (path,label[,split]); sound event detection probes the frames")
    rows = None
    if not events:
        rows, leaks = check_leakage(read_labels(labels), labels)
        for message in leaks:
            warn(message)
    if finetune_cfg is not None and rows is not None and rows[0].split is None:
        raise ProbeError(FINETUNE_NEEDS_SPLITS.format(labels))
    weighted = layer == "weighted"
    bundle = load_encoder(ckpt).set_layer("all" if weighted else layer).set_pool(pool)
    groups = weighted_groups(bundle) if weighted else 1
    skipped = []

    def skip(p: str, r: str) -> None:
        skipped.append(p)
        if on_skip is not None:
            on_skip(p, r)

    def run_embed(items: list[tuple[str, str]], frames: bool):
        if embed is not None:
            return embed(bundle, items, frames, skip)
        return embed_files(bundle, items, dev, frames, batch_size, on_skip=skip)

    if events:
        return _probe_events(bundle, labels, files, frame_hop, run_embed, seed, skip, skipped, median,
                             finetune_cfg, save, on_epoch, warn, dev, batch_size, groups) | {"checkpoint": ckpt,
                                                                                               "layer": layer}

    emb = {e.path: e.clip for e in run_embed([(r.path, r.rel) for r in rows], False)}
    kept = [r for r in rows if r.path in emb]
    if len(kept) < 10:
        raise ProbeError(f"only {len(kept)} usable files in {labels} ({len(skipped)} skipped)", code=4)
    for message in check_classes([r.labels for r in kept], [r.split for r in kept], labels):
        warn(message)
    X = np.stack([emb[r.path] for r in kept])
    res = evaluate(X, [r.labels for r in kept], [r.split for r in kept], seed, return_fit=finetune_cfg is not None,
                   mlp=mlp, confusion=confusion, groups=groups)
    if finetune_cfg is not None:
        res, fit = res
        classes, y, multilabel = encode_labels([r.labels for r in kept])
        task = Task([r.path for r in kept], list(y), "multilabel" if multilabel else "multiclass", classes)
        res["finetune"] = _finetune(bundle, task, fit, finetune_cfg, dev, seed, batch_size, save, on_epoch)
    res.update(checkpoint=ckpt, labels=str(labels), skipped=len(skipped), layer=layer,
               pool="+".join(bundle.clip_stats))
    return res


def weighted_groups(bundle) -> int:
    """How many layers `--layer weighted` sums (the bundle set to layer 'all'): every layer of the
    encoder, which must all have one width, and at least two of them."""
    widths = bundle.layer_widths()
    if len(widths) < 2 or len(set(widths)) > 1:
        raise ProbeError(f"--layer weighted needs two or more layers of one width; this encoder's layer widths "
                         f"are {widths} (--layer all probes them side by side)")
    return len(widths)


def _finetune(bundle, task: Task, fit, cfg: FinetuneConfig, dev, seed: int, batch_size: int, save, on_epoch) -> dict:
    metrics, model = finetune(bundle, task, fit, cfg, dev, seed, batch_size, on_epoch)
    if save is not None:
        metrics["saved"] = [str(p) for p in save_finetuned(save, model, task, metrics)]
    return metrics


def _probe_events(bundle, labels: str | Path, files: str | Path | None, hop: float, run_embed: Callable,
                  seed: int, skip: Callable[[str, str], None], skipped: list, median: int | None,
                  finetune_cfg: FinetuneConfig | None, save, on_epoch, warn: Callable[[str], None], dev,
                  batch_size: int, groups: int = 1) -> dict:
    """The sound event detection probe of `bundle` on the strong labels in `labels` (and `files`).

    `run_embed(items, frames)` embeds (calling `skip`); `skipped` is the list `skip` fills, for the counts."""
    clips = read_events(labels, files, warn)
    if finetune_cfg is not None and clips[0].split is None:
        raise ProbeError(FINETUNE_NEEDS_SPLITS.format(files or labels))
    classes = sorted({lab for f in clips for _, _, lab in f.events})
    if len(classes) < 2:
        raise ProbeError("need at least two event classes to probe", code=4)
    cidx = {c: i for i, c in enumerate(classes)}
    emb = {e.path: e for e in run_embed([(f.path, f.rel) for f in clips], True)}
    kept = [f for f in clips if f.path in emb]
    if len(kept) < 5:
        raise ProbeError(f"only {len(kept)} usable files in {labels} ({len(skipped)} skipped)", code=4)
    for message in check_classes([tuple(sorted({lab for _, _, lab in f.events})) for f in kept],
                                 [f.split for f in kept], labels, min_files=2):
        warn(message)
    past = sum(on >= emb[f.path].seconds for f in kept for on, _, _ in f.events)
    total = sum(len(f.events) for f in kept)
    if total and past == total:  # all-zero targets: a probe of nothing, not a score
        raise ProbeError(f"{labels}: every event starts after the end of its file (onset and offset are "
                         f"in seconds)", code=4)
    if past:
        warn(f"{labels}: {past} of {total} events start after the end of their file and mark no frame "
             f"(onset and offset are in seconds)")
    grids = [to_grid(emb[f.path].frames, emb[f.path].times, emb[f.path].seconds, hop) for f in kept]
    targets = [frame_targets(f.events, len(g), hop, cidx) for f, g in zip(kept, grids)]
    refs = [[(on, off, cidx[lab]) for on, off, lab in f.events] for f in kept]
    res = evaluate_events(grids, targets, [f.split for f in kept], classes, seed, events=refs,
                          durations=[emb[f.path].seconds for f in kept], hop=hop, median=median,
                          return_fit=finetune_cfg is not None, groups=groups)
    if finetune_cfg is not None:
        res, fit = res
        task = Task([f.path for f in kept], targets, "sed", classes, events=refs, hop=hop, median=median)
        res["finetune"] = _finetune(bundle, task, fit, finetune_cfg, dev, seed, batch_size, save, on_epoch)
    res.update(labels=str(labels), skipped=len(skipped), frame_hop=hop, classes=classes)
    return res


# -- probe suites ---------------------------------------------------------------------------------
#
# A suite YAML lists tasks; each checkpoint is probed on each task (encoder loaded afresh per task,
# so a random:PRESET baseline fits its input statistics on that task's files, as a single probe
# does). Features go through a cache: one safetensors file per (checkpoint, task file list, clip or
# frame features), named by features.encoder_identity (weights, settings, layer, version) and a
# hash of the files (paths, sizes, modification times); written atomically, so an interrupted run
# leaves no partial file, and a later run (another probe, another seed) embeds nothing again.

MAIN_METRIC = {"multiclass": "accuracy", "multilabel": "map", "sound_event_detection": "event_f1"}


@dataclass
class SuiteTask:
    name: str
    labels: Path
    files: Path | None = None
    frame_hop: float = 0.1


def read_suite(path: str | Path) -> list[SuiteTask]:
    """The tasks of a suite YAML: `tasks: [{name, labels, files?, frame_hop?}, ...]`, paths relative
    to the YAML's folder. Problems are a ProbeError naming the file and the task."""
    p = Path(path)
    if not p.is_file():
        raise ProbeError(f"{p}: no such suite file")
    try:
        doc = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ProbeError(f"{p}: not a YAML file ({str(e).splitlines()[0]})") from None
    tasks = doc.get("tasks") if isinstance(doc, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise ProbeError(f"{p}: needs a non-empty `tasks:` list of {{name, labels, files?, frame_hop?}}")
    out, names = [], set()
    for i, t in enumerate(tasks):
        where = f"{p}: task {i + 1}"
        if not isinstance(t, dict):
            raise ProbeError(f"{where}: must be a mapping with name and labels")
        unknown = sorted(set(t) - {"name", "labels", "files", "frame_hop"})
        if unknown:
            raise ProbeError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (name, labels, files, frame_hop)")
        name, labels = t.get("name"), t.get("labels")
        if not isinstance(name, str) or not name.strip() or not isinstance(labels, str) or not labels.strip():
            raise ProbeError(f"{where}: needs `name` and `labels` (strings)")
        if name in names:
            raise ProbeError(f"{where}: task name '{name}' used twice")
        names.add(name)
        hop = t.get("frame_hop", 0.1)
        check_frame_hop(hop, f"{where} ({name}): frame_hop")
        files = t.get("files")
        if files is not None and not isinstance(files, str):
            raise ProbeError(f"{where} ({name}): files must be a path")
        lab = Path(labels) if Path(labels).is_absolute() else p.parent / labels
        if not lab.is_file():
            raise ProbeError(f"{where} ({name}): {lab}: no such labels file")
        fp = None if files is None else (Path(files) if Path(files).is_absolute() else p.parent / files)
        if fp is not None and not fp.is_file():
            raise ProbeError(f"{where} ({name}): {fp}: no such files CSV")
        out.append(SuiteTask(name, lab, fp, float(hop)))
    return out


def default_cache_dir(suite: str | Path) -> Path:
    """`.sslaudio-cache/` beside the suite YAML (SSLAUDIO_CACHE overrides it)."""
    env = os.environ.get("SSLAUDIO_CACHE")
    return Path(env) if env else Path(suite).resolve().parent / ".sslaudio-cache"


class FeatureCache:
    """embed(bundle, items, frames, on_skip) for probe_checkpoint, backed by safetensors files in
    `root`; `misses` counts the embeddings computed (the rest came from the cache)."""

    def __init__(self, root: str | Path, device, batch_size: int = 16, layer: int | str | None = None):
        self.root, self.device, self.batch_size, self.layer = Path(root), device, batch_size, layer
        self.misses = self.hits = 0

    def key(self, bundle, items: list[tuple[str, str]], frames: bool) -> str:
        ident = encoder_identity(bundle, frames=frames, layer=self.layer, chunk_seconds=30.0,
                                 needs_stats=bool(getattr(bundle, "needs_stats", False)))
        stamps = [(path, _stamp(path)) for path, _ in items]
        return f"{ident}-{hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:24]}"

    def __call__(self, bundle, items: list[tuple[str, str]], frames: bool, on_skip: Callable[[str, str], None]):
        path = self.root / f"{self.key(bundle, items, frames)}.{'frames' if frames else 'clip'}.safetensors"
        cached = self._read(path, frames)
        if cached is not None:
            self.hits += 1
            embs, skipped = cached
            for p, reason in skipped:
                on_skip(p, reason)
            return embs
        self.misses += 1
        skipped: list[tuple[str, str]] = []

        def skip(p: str, reason: str) -> None:
            skipped.append((p, reason))
            on_skip(p, reason)

        embs = list(embed_files(bundle, items, self.device, frames, self.batch_size, on_skip=skip))
        self._write(path, embs, skipped, frames)
        return embs

    @staticmethod
    def _write(path: Path, embs: list[Embedding], skipped: list, frames: bool) -> None:
        t = {"clip": np.stack([e.clip for e in embs]).astype(np.float32) if embs else np.zeros((0, 1), np.float32),
             "seconds": np.array([e.seconds for e in embs], dtype=np.float64)}
        if frames and embs:
            t["frames"] = np.concatenate([e.frames for e in embs]).astype(np.float32)
            t["times"] = np.concatenate([e.times for e in embs]).astype(np.float64)
            t["lengths"] = np.array([len(e.frames) for e in embs], dtype=np.int64)
        meta = {"format": "sslaudio-probe-cache", "paths": json.dumps([[e.path, e.rel] for e in embs]),
                "skipped": json.dumps(skipped)}
        atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, tmp,
                                                 metadata=meta))

    @staticmethod
    def _read(path: Path, frames: bool):
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            paths, skipped = json.loads(meta["paths"]), [tuple(s) for s in json.loads(meta["skipped"])]
        except (OSError, SafetensorError, KeyError, ValueError, TypeError):  # unreadable or foreign: embed again
            return None
        if meta.get("format") != "sslaudio-probe-cache" or len(paths) != len(t["seconds"]):
            return None
        out = []
        if frames and paths:
            ends = np.cumsum(t["lengths"])
            fr, tm = np.split(t["frames"], ends[:-1]), np.split(t["times"], ends[:-1])
        for i, (p, rel) in enumerate(paths):
            out.append(Embedding(p, rel, t["clip"][i], fr[i] if frames else None, tm[i] if frames else None,
                                 float(t["seconds"][i])))
        return out, skipped


def _stamp(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def main_metric(res: dict, mlp: bool = False) -> str:
    """The metric a suite table shows for one result: accuracy (single-label), map (multi-label),
    event_f1 (sound event detection); `mlp_` prefixed for the MLP probe."""
    m = MAIN_METRIC[res["task"]]
    return f"mlp_{m}" if mlp else m


def probe_suite(ckpts: list[str], suite: str | Path, cache: str | Path | None = None, batch_size: int = 16,
                device: str = "auto", seed: int = 0, layer: int | str | None = None, mlp: bool = False,
                pool: str | None = None, on_skip: Callable[[str, str], None] | None = None, on_warn: Callable[[str], None] | None = None,
                on_result: Callable[[str, str, dict], None] | None = None) -> dict:
    """Probe every checkpoint on every task of `suite`; -> {suite, cache, tasks, checkpoints,
    results: {task: {checkpoint: metrics}}, main_metric: {task: name}, table: {task: {checkpoint:
    value}}, extracted, cached}. `mlp` runs the MLP probe on the clip tasks too, `pool` pools their
    clip embeddings with those statistics (probe_checkpoint)."""
    tasks = read_suite(suite)
    if len(set(ckpts)) != len(ckpts):
        raise ProbeError("a checkpoint is given twice")
    root = Path(cache) if cache is not None else default_cache_dir(suite)
    fc = FeatureCache(root, resolve_device(device), batch_size, "all" if layer == "weighted" else layer)
    results: dict[str, dict[str, dict]] = {}
    metric: dict[str, str] = {}
    for task in tasks:
        results[task.name] = {}
        for ckpt in ckpts:
            events = is_event_csv(task.labels)
            r = probe_checkpoint(ckpt, task.labels, batch_size, device, seed, layer=layer, files=task.files,
                                 frame_hop=task.frame_hop, on_skip=on_skip, on_warn=on_warn,
                                 mlp=mlp and not events, confusion=not events, embed=fc,
                                 pool=None if events else pool)
            r["task_name"] = task.name
            results[task.name][ckpt] = r
            metric[task.name] = main_metric(r)
            if on_result is not None:
                on_result(task.name, ckpt, r)
    table = {t: {c: r.get(metric[t]) for c, r in per.items()} for t, per in results.items()}
    out = {"suite": str(suite), "cache": str(root), "tasks": [t.name for t in tasks], "checkpoints": list(ckpts),
           "main_metric": metric, "table": table, "results": results, "extracted": fc.misses, "cached": fc.hits}
    if mlp:
        out["table_mlp"] = {t: {c: r.get("mlp_" + metric[t]) for c, r in per.items()} for t, per in results.items()
                            if "mlp_" + metric[t] in next(iter(per.values()))}
    return out
