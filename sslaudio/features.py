"""Embedding extraction: clip (D,) and frame (T, D) features for whole files, in bounded memory.

Files of equal length are batched (so no padding changes any result) and pooled by the encoder's
own `pool`; files longer than `chunk_seconds` are encoded chunk by chunk, with the encoder's clip
statistics accumulated over the chunks (`encoders.base.ClipPool`). Frame timestamps are the
encoder's `frame_times` (receptive-field centres), offset by each chunk's start. Each output file is written atomically; FEATS/manifest.jsonl,
errors.jsonl and summary.json describe the run.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors.numpy import save_file

from sslaudio.atomic import atomic_write
from sslaudio.audio import AudioError, AudioInfo, blocks, load, probe
from sslaudio.data import CropDataset, sample_for_stats
from sslaudio.encoders.base import ClipPool
from sslaudio.inference import EncoderBundle


@dataclass
class Embedding:
    path: str
    rel: str
    clip: np.ndarray  # (D,)
    frames: np.ndarray | None  # (T, D)
    times: np.ndarray | None  # (T,) seconds, frame centres
    seconds: float


def _min_samples(bundle: EncoderBundle) -> int:
    return 2 * int(bundle.encoder.downsample)


@torch.no_grad()
def fit_stats_if_needed(bundle: EncoderBundle, infos: list[AudioInfo], device: torch.device) -> None:
    """Random-init baselines have no training statistics: estimate them from (up to 64) inputs."""
    if not bundle.needs_stats or not infos:
        return
    p = bundle.preset
    ds = CropDataset(infos, p.data.sample_rate, p.data.clip_seconds, 1, p.seed)
    bundle.frontend.estimate_stats(sample_for_stats(ds, min(64, len(infos)), p.seed).to(device))
    bundle.needs_stats = False


def embed_files(bundle: EncoderBundle, items: list[tuple[str, str]], device: torch.device, frames: bool,
                batch_size: int = 16, chunk_seconds: float = 30.0,
                on_skip: Callable[[str, str], None] | None = None) -> Iterator[Embedding]:
    """Yield one Embedding per usable file (unusable ones go to `on_skip(path, reason)`)."""
    on_skip = on_skip or (lambda p, r: print(f"skip {p}: {r}", file=sys.stderr))
    sr = bundle.sample_rate
    infos: dict[str, AudioInfo] = {}
    for path, _ in items:
        try:
            infos[path] = probe(path)
        except AudioError as e:
            on_skip(path, str(e))
        except OSError as e:
            on_skip(path, f"unreadable ({e.strerror})")
    bundle.to(device).eval()
    fit_stats_if_needed(bundle, list(infos.values()), device)
    enc = bundle.encoder
    chunk = max(1, int(chunk_seconds * sr / enc.downsample)) * enc.downsample  # whole frames per chunk
    groups: dict[tuple[int, int], list[tuple[str, str]]] = defaultdict(list)
    long_files = []
    for path, rel in items:
        if path not in infos:
            continue
        info = infos[path]
        if info.frames * sr / info.sample_rate > chunk:
            long_files.append((path, rel))
        else:
            groups[(info.frames, info.sample_rate)].append((path, rel))

    @torch.inference_mode()
    def run(audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if audio.shape[-1] < _min_samples(bundle):
            audio = torch.nn.functional.pad(audio, (0, _min_samples(bundle) - audio.shape[-1]))
        return bundle.embed(audio.to(device))

    def finish(path, rel, clip, frame_list, time_list, seconds) -> Embedding:
        clip = clip.float().cpu().numpy()
        if frames:
            f = torch.cat(frame_list).float().cpu().numpy()
            return Embedding(path, rel, clip, f, np.concatenate(time_list), seconds)
        return Embedding(path, rel, clip, None, None, seconds)

    for key in sorted(groups):
        members = groups[key]
        for i in range(0, len(members), batch_size):
            part, audio = [], []
            for path, rel in members[i:i + batch_size]:
                try:
                    audio.append(load(path, sr))
                    part.append((path, rel))
                except AudioError as e:
                    on_skip(path, str(e))
            if not part:
                continue
            n = min(a.shape[0] for a in audio)
            clips, fr, flen = run(torch.stack([a[:n] for a in audio]))
            for j, (path, rel) in enumerate(part):
                t = int(flen[j])
                yield finish(path, rel, clips[j], [fr[j, :t]], [enc.frame_times(t).numpy()], n / sr)
    for path, rel in long_files:
        pool, frame_list, time_list, total = ClipPool(enc.clip_pool), [], [], 0
        try:
            for start, x in blocks(path, sr, chunk / sr):
                _, fr, flen = run(x[None])
                f = fr[0, : int(flen[0])]
                pool.add(f)
                if frames:
                    frame_list.append(f.cpu())
                    time_list.append(enc.frame_times(f.shape[0]).numpy() + start / sr)
                total += x.shape[0]
        except AudioError as e:
            on_skip(path, str(e))
            continue
        yield finish(path, rel, pool.value(), frame_list, time_list, total / sr)


def write_embedding(e: Embedding, out_dir: Path, fmt: str, meta: dict[str, str]) -> list[str]:
    """FEATS/<rel>.safetensors ('clip', 'frames', 'timestamps'), or <rel>.npy (+ .frames.npy,
    .timestamps.npy). Returns the written paths relative to out_dir."""
    base = out_dir / e.rel
    if fmt == "safetensors":
        tensors = {"clip": e.clip.astype(np.float32)}
        if e.frames is not None:
            tensors["frames"] = np.ascontiguousarray(e.frames, dtype=np.float32)
            tensors["timestamps"] = e.times.astype(np.float32)
        target = base.with_name(base.name + ".safetensors")
        atomic_write(target, lambda t: save_file(tensors, t, metadata={**meta, "source": e.path}))
        return [str(target.relative_to(out_dir))]
    written = []
    arrays = [("", e.clip)] + ([(".frames", e.frames), (".timestamps", e.times)] if e.frames is not None else [])
    for suffix, arr in arrays:
        target = base.with_name(base.name + suffix + ".npy")

        def write(t, arr=arr):
            with open(t, "wb") as f:
                np.save(f, arr.astype(np.float32))

        atomic_write(target, write)
        written.append(str(target.relative_to(out_dir)))
    return written


def extract(bundle: EncoderBundle, items: list[tuple[str, str]], out_dir: Path | None, frames: bool, fmt: str,
            device: torch.device, batch_size: int, encoder_id: str, on_skip=None, on_file=None) -> dict:
    """Write features for `items` under out_dir (None: JSON lines on stdout). Returns the summary."""
    t0 = time.time()
    errors: list[dict] = []

    def skip(path: str, reason: str) -> None:
        errors.append({"path": path, "error": reason})
        (on_skip or (lambda p, r: print(f"skip {p}: {r}", file=sys.stderr)))(path, reason)

    meta = {"encoder": encoder_id, "sample_rate": str(bundle.sample_rate)}
    manifest = []
    dim = None
    for e in embed_files(bundle, items, device, frames, batch_size, on_skip=skip):
        dim = int(e.clip.shape[0])
        if out_dir is None:
            row = {"path": e.path, "clip": [round(float(v), 6) for v in e.clip]}
            if e.frames is not None:
                row["frames"] = np.round(e.frames, 6).tolist()
                row["timestamps"] = np.round(e.times, 4).tolist()
            sys.stdout.write(json.dumps(row) + "\n")
            sys.stdout.flush()
        else:
            outputs = write_embedding(e, out_dir, fmt, meta)
            manifest.append({"path": e.path, "outputs": outputs, "seconds": round(e.seconds, 4),
                             "frames": 0 if e.frames is None else int(e.frames.shape[0])})
        if on_file:
            on_file(e)
    summary = {"files": len(items), "written": len(items) - len(errors), "skipped": len(errors),
               "clip_dim": dim, "encoder": encoder_id, "format": fmt, "frames": frames,
               "time_s": round(time.time() - t0, 3)}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, rows in (("manifest.jsonl", manifest), ("errors.jsonl", errors)):
            atomic_write(out_dir / name,
                         lambda t, rows=rows: Path(t).write_text("".join(json.dumps(r) + "\n" for r in rows)))
        atomic_write(out_dir / "summary.json", lambda t: Path(t).write_text(json.dumps(summary, indent=1)))
    return summary
