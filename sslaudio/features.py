"""Embedding extraction: clip (D,) and frame (T, D) features for whole files, in bounded memory.

Files of equal length are batched (so no padding changes any result) and pooled by the encoder's
own `pool`; files longer than `chunk_seconds` are encoded chunk by chunk, with the encoder's clip
statistics accumulated over the chunks (`encoders.base.ClipPool`). Frame timestamps are the
encoder's `frame_times` (receptive-field centres), offset by each chunk's start. Files shorter
than the encoder's minimum input are skipped, never zero-padded into frames past their end.

`extract` writes each output file atomically, with an encoder identity in its metadata (a hash of
the weights and of the options that change the numbers); a rerun into the same folder keeps the
outputs of the same identity (and unchanged source file), computes the rest in the batches a
clean run would use, so the result is byte-identical to one clean run, removes the temp files of
an interrupted run, and rewrites FEATS/manifest.jsonl, errors.jsonl and summary.json for the
whole input. Outputs of another identity are replaced, with a warning and a count.

Options: `all_layers` also embeds every layer's output as `--layer i` gives it (frames `layers`
(L, T, D), clips `layer_clips` (L, D), each layer pooled with its own ClipPool in long files);
the clip statistics are the bundle's `clip_stats` (`EncoderBundle.set_pool` replaces the
encoder's `clip_pool`, summed as `encoders.base.pool_frames` does); `batch_seconds` caps the audio per batch (files of equal length are still the only ones
batched together, so a batch never pads).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import weakref
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from sslaudio import __version__
from sslaudio.atomic import TEMP_NAME, atomic_write
from sslaudio.audio import AudioError, AudioInfo, blocks, load, probe, resampled_length
from sslaudio.build import shortest_length
from sslaudio.checkpoint import tensors_sha256
from sslaudio.data import CropDataset, dedupe, sample_for_stats
from sslaudio.encoders.base import ClipPool, lengths_to_padding, pool_frames
from sslaudio.inference import EncoderBundle

RUN_FILES = ("manifest.jsonl", "errors.jsonl", "summary.json")
WRITE_AHEAD = (32, 256 << 20)  # files, and bytes of features, the writer thread may be behind the encoder


class OutputCollision(ValueError):
    """Two inputs would be written to the same output file."""


@dataclass
class Embedding:
    path: str
    rel: str
    clip: np.ndarray  # (D,)
    frames: np.ndarray | None  # (T, D)
    times: np.ndarray | None  # (T,) seconds, frame centres
    seconds: float
    layer_clips: np.ndarray | None = None  # (L, D) every layer's clip embedding, with all_layers
    layers: np.ndarray | None = None  # (L, T, D) every layer's frames, with all_layers and frames


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}".rstrip("0").rstrip(".")


_MIN_SAMPLES: "weakref.WeakKeyDictionary[EncoderBundle, dict]" = weakref.WeakKeyDictionary()


@torch.inference_mode()
def min_samples(bundle: EncoderBundle, device: torch.device | str = "cpu") -> int:
    """The shortest waveform (samples at bundle.sample_rate) the encoder turns into at least one
    frame, found by bisection on silent inputs (every encoder's minimum grows with the length)."""
    cache = _MIN_SAMPLES.setdefault(bundle, {})
    key = (str(device), bundle.layer)
    if key in cache:
        return cache[key]

    def works(n: int) -> bool:
        try:
            clip, _, lengths = bundle.embed(torch.zeros(1, n, device=device))
            return int(lengths[0]) >= 1 and clip.shape[-1] > 0
        except (ValueError, RuntimeError, IndexError):
            return False

    limit = 64 * int(bundle.encoder.downsample) + 1_000_000
    n = shortest_length(works, max(2, 2 * int(bundle.encoder.downsample)), limit)
    if n is None:
        raise RuntimeError(f"{type(bundle.encoder).__name__} embeds no input up to {limit} samples")
    cache[key] = n
    return n


@torch.no_grad()
def fit_stats_if_needed(bundle: EncoderBundle, infos: list[AudioInfo], device: torch.device) -> None:
    """Random-init baselines have no training statistics: estimate them from (up to 64) inputs."""
    if not bundle.needs_stats or not infos:
        return
    p = bundle.preset
    ds = CropDataset(infos, p.data.sample_rate, p.data.clip_seconds, 1, p.seed)
    bundle.frontend.estimate_stats(sample_for_stats(ds, min(64, len(infos)), p.seed).to(device))
    bundle.needs_stats = False


@dataclass
class Plan:
    """The files to embed after probing, in the batches a full run uses (so that a resumed run
    computes every remaining file in exactly the batch it would have had)."""
    groups: dict[tuple[int, int], list[tuple[str, str]]] = field(default_factory=dict)  # (frames, sr) ->
    long_files: list[tuple[str, str]] = field(default_factory=list)
    lengths: dict[tuple[int, int], int] = field(default_factory=dict)  # group -> samples at the target rate
    infos: dict[str, AudioInfo] = field(default_factory=dict)
    need: int = 1  # the encoder's minimum input (samples)
    chunk: int = 1  # samples per chunk of a long file

    def items(self) -> list[tuple[str, str]]:
        return [it for key in sorted(self.groups) for it in self.groups[key]] + self.long_files


def plan_files(bundle: EncoderBundle, items: list[tuple[str, str]], device: torch.device,
               chunk_seconds: float = 30.0, on_skip: Callable[[str, str], None] | None = None) -> Plan:
    """Probe every file (unusable ones go to `on_skip(path, reason)`, once per item), estimate a
    random-init bundle's statistics, and group the rest into equal-length batches and long files."""
    on_skip = on_skip or (lambda p, r: print(f"skip {p}: {r}", file=sys.stderr))
    sr = bundle.sample_rate
    bundle.to(device).eval()
    plan = Plan(need=min_samples(bundle, device))
    enc = bundle.encoder
    plan.chunk = max(1, int(chunk_seconds * sr / enc.downsample)) * enc.downsample  # whole frames per chunk
    problems: dict[str, str] = {}
    usable: list[tuple[str, str]] = []
    for path, rel in items:
        if path not in plan.infos and path not in problems:
            try:
                info = probe(path)
                n = resampled_length(info.frames, info.sample_rate, sr)
                if n < plan.need:
                    raise AudioError(f"too short: {_ms(info.seconds)} ms < {_ms(plan.need / sr)} ms the "
                                     f"encoder needs")
                plan.infos[path] = info
            except AudioError as e:
                problems[path] = str(e)
        if path in problems:
            on_skip(path, problems[path])
        else:
            usable.append((path, rel))
    fit_stats_if_needed(bundle, list(plan.infos.values()), device)
    groups: dict[tuple[int, int], list[tuple[str, str]]] = defaultdict(list)
    for path, rel in usable:
        info = plan.infos[path]
        n = resampled_length(info.frames, info.sample_rate, sr)
        if n > plan.chunk:
            plan.long_files.append((path, rel))
        else:
            groups[(info.frames, info.sample_rate)].append((path, rel))
            plan.lengths[(info.frames, info.sample_rate)] = n
    plan.groups = dict(groups)
    return plan


@torch.inference_mode()
def encode(bundle: EncoderBundle, audio: torch.Tensor, all_layers: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor] | None, torch.Tensor | None]:
    """(B, S) -> clip (B, D), frames (B, T, D), frame lengths (B,), and with `all_layers` every
    layer's frames [(B, T, D_l)] as `--layer i` gives them and their clips (B, L, D_l), each pooled
    with the bundle's `clip_stats`; without `all_layers` this is `bundle.embed`."""
    if not all_layers:
        return (*bundle.embed(audio), None, None)
    stats, enc = bundle.clip_stats, bundle.encoder
    if bundle.layer is not None:
        raise ValueError("all_layers embeds every layer: the bundle must not have a layer set")
    x, fl = bundle.frontend(audio)
    out = enc(x, fl, return_layers=True)
    fr, flen = enc.to_frames(out)
    padding = lengths_to_padding(flen, fr.shape[1])
    # each block's frames as EncoderBundle.forward gives them for `--layer i` (its tokens swapped in)
    layers = [enc.to_frames(replace(out, tokens=h))[0] for h in (out.layers or [out.tokens])]
    layer_clips = torch.stack([pool_frames(h, padding, stats) for h in layers], 1)
    return pool_frames(fr, padding, stats), fr, flen, layers, layer_clips


def batches(members: list, batch_size: int, samples: int, batch_seconds: float | None, sample_rate: int
            ) -> Iterator[list]:
    """`members` (inputs of `samples` samples each) in batches of at most `batch_size` inputs and,
    with `batch_seconds`, at most that much audio (one input at least)."""
    size = batch_size
    if batch_seconds is not None:
        size = max(1, min(batch_size, int(batch_seconds * sample_rate // max(samples, 1))))
    for i in range(0, len(members), size):
        yield members[i:i + size]


def _decode(batch: list[tuple[str, str]], sr: int) -> list[tuple[str, str, torch.Tensor | None, str | None]]:
    """Decode and resample one batch's files: (path, rel, audio or None, problem or None) each."""
    out = []
    for path, rel in batch:
        try:
            out.append((path, rel, load(path, sr), None))
        except AudioError as e:
            out.append((path, rel, None, str(e)))
    return out


def prefetch(fn: Callable, items: list, workers: int, ahead: int = 2) -> Iterator:
    """fn(item) for each item, in order, computed up to `workers * ahead` items ahead in `workers`
    threads (soundfile's decoding and torch's resampling release the GIL); in line when workers
    is 0. Bounded memory: at most that many results wait."""
    if workers <= 0:
        yield from map(fn, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sslaudio-decode") as pool:
        queue: deque = deque()
        it = iter(items)

        def fill() -> None:
            for item in it:
                queue.append(pool.submit(fn, item))
                if len(queue) >= workers * ahead:
                    return

        fill()
        try:
            while queue:
                future = queue.popleft()
                fill()
                yield future.result()
        finally:  # the consumer stopped early (an error, a closed pipe): drop what has not started
            for future in queue:
                future.cancel()


def run_plan(bundle: EncoderBundle, plan: Plan, device: torch.device, frames: bool, batch_size: int = 16,
             on_skip: Callable[[str, str], None] | None = None, done: set[str] | frozenset = frozenset(),
             all_layers: bool = False, batch_seconds: float | None = None,
             workers: int = 1) -> Iterator[Embedding]:
    """Yield one Embedding per usable file of `plan` whose output name is not in `done`. A batch
    holding a done file is still computed whole, so the others get the numbers of a full run.
    `workers` threads decode and resample the next batches while the encoder runs (0: decode in
    line); results come in the same order either way."""
    on_skip = on_skip or (lambda p, r: print(f"skip {p}: {r}", file=sys.stderr))
    sr, enc = bundle.sample_rate, bundle.encoder
    stats = bundle.clip_stats

    def run(audio: torch.Tensor):
        return encode(bundle, audio.to(device), all_layers)

    def finish(path, rel, clip, frame_list, time_list, seconds, layer_clips=None, layer_lists=None) -> Embedding:
        clip = clip.float().cpu().numpy()
        lc = None if layer_clips is None else layer_clips.float().cpu().numpy()
        if frames:
            f = torch.cat(frame_list).float().cpu().numpy() if frame_list else np.zeros((0, clip.shape[0]), np.float32)
            t = np.concatenate(time_list) if time_list else np.zeros(0)
            ls = None
            if layer_lists is not None:
                ls = np.stack([torch.cat(per).float().cpu().numpy() if per else
                               np.zeros((0, lc.shape[1]), np.float32) for per in layer_lists])
            return Embedding(path, rel, clip, f, t, seconds, lc, ls)
        return Embedding(path, rel, clip, None, None, seconds, lc)

    times: dict[int, np.ndarray] = {}  # frame count -> frame times (read-only, shared by every file)

    def embed_batch(members: list[tuple[str, str]], audio: list[torch.Tensor]) -> Iterator[Embedding]:
        n = audio[0].shape[0]
        clips, fr, flen, hs, hclips = run(torch.stack(audio))
        # one conversion per batch; each file gets views of its rows
        clips_np, lengths = clips.float().cpu().numpy(), flen.tolist()
        lc_np = None if hclips is None else hclips.float().cpu().numpy()  # (B, L, D)
        fr_np = fr.float().cpu().numpy() if frames else None
        hs_np = np.stack([h.float().cpu().numpy() for h in hs]) if frames and hs is not None else None  # (L, B, T, D)
        for j, (path, rel) in enumerate(members):
            if rel in done:
                continue
            lc = None if lc_np is None else lc_np[j]
            if not frames:
                yield Embedding(path, rel, clips_np[j], None, None, n / sr, lc)
                continue
            t = int(lengths[j])
            if t not in times:
                times[t] = enc.frame_times(t).numpy()
            yield Embedding(path, rel, clips_np[j], fr_np[j, :t], times[t], n / sr, lc,
                            None if hs_np is None else hs_np[:, j, :t])

    work = [(key, batch) for key in sorted(plan.groups)
            for batch in batches(plan.groups[key], batch_size, plan.lengths[key], batch_seconds, sr)
            if not all(rel in done for _, rel in batch)]
    for (key, batch), decoded in zip(work, prefetch(lambda kb: _decode(kb[1], sr), work, workers)):
        # one batch, decoded ahead by the worker threads while the encoder runs
        part, audio, alone = [], [], []
        for path, rel, a, problem in decoded:
            if problem is not None:
                if rel not in done:
                    on_skip(path, problem)
                continue
            if a.shape[0] == plan.lengths[key]:
                part.append((path, rel))
                audio.append(a)
            elif rel not in done:  # decoded to another length than its header said: on its own
                alone.append(((path, rel), a))
        if part:
            yield from embed_batch(part, audio)
        for (path, rel), a in alone:
            if a.shape[0] < plan.need:
                on_skip(path, f"too short: {_ms(a.shape[0] / sr)} ms decoded < {_ms(plan.need / sr)} ms "
                              f"the encoder needs")
                continue
            yield from embed_batch([(path, rel)], [a])
    for path, rel in plan.long_files:
        if rel in done:
            continue
        clip_pool, frame_list, time_list, total = ClipPool(stats), [], [], 0
        layer_pools: list[ClipPool] | None = None  # with all_layers: one per block
        layer_lists: list[list[torch.Tensor]] | None = None
        # each chunk reads `reach` samples past its end, so that the frames centred near the end of
        # the chunk are whole (a wave encoder's 400-sample receptive field per 320-sample hop); a
        # chunk keeps the frames centred inside it, the last one every frame centred in the file
        reach = max(0, plan.need - int(enc.downsample))
        try:
            chunks = blocks(path, sr, (plan.chunk + reach) / sr, reach / sr)
            ahead = next(chunks, None)
            while ahead is not None:
                (start, x), ahead = ahead, next(chunks, None)
                length = x.shape[0]
                end = (start + (length if ahead is None else min(length, plan.chunk))) / sr
                if length < plan.need:  # a short tail: pad it, keep the frames centred in the file
                    x = torch.nn.functional.pad(x, (0, plan.need - length))
                _, fr, flen, hs, _ = run(x[None])
                t = int(flen[0])
                f = fr[0, :t]
                hs = None if hs is None else [h[0, :t] for h in hs]
                times = enc.frame_times(f.shape[0]).numpy() + start / sr
                keep = times < end
                if not keep.all():
                    sel = torch.from_numpy(keep).to(f.device)
                    f, times = f[sel], times[keep]
                    hs = None if hs is None else [h[sel] for h in hs]
                total = max(total, start + length)
                if f.shape[0] == 0:
                    continue
                clip_pool.add(f)
                if hs is not None:
                    if layer_pools is None:
                        layer_pools, layer_lists = [ClipPool(stats) for _ in hs], [[] for _ in hs]
                    for lp, h in zip(layer_pools, hs):
                        lp.add(h)
                if frames:
                    frame_list.append(f.cpu())
                    time_list.append(times)
                    if hs is not None:
                        for per, h in zip(layer_lists, hs):
                            per.append(h.cpu())
        except AudioError as e:
            on_skip(path, str(e))
            continue
        layer_clips = None if layer_pools is None else torch.stack([lp.value() for lp in layer_pools])
        yield finish(path, rel, clip_pool.value(), frame_list, time_list, total / sr, layer_clips,
                     layer_lists if frames else None)


def embed_files(bundle: EncoderBundle, items: list[tuple[str, str]], device: torch.device, frames: bool,
                batch_size: int = 16, chunk_seconds: float = 30.0,
                on_skip: Callable[[str, str], None] | None = None, all_layers: bool = False,
                batch_seconds: float | None = None, workers: int = 1) -> Iterator[Embedding]:
    """Yield one Embedding per usable file (unusable ones go to `on_skip(path, reason)`)."""
    plan = plan_files(bundle, items, device, chunk_seconds, on_skip)
    yield from run_plan(bundle, plan, device, frames, batch_size, on_skip, all_layers=all_layers,
                        batch_seconds=batch_seconds, workers=workers)


def encoder_identity(bundle: EncoderBundle, **options) -> str:
    """A hash of the bundle's weights and buffers (state_dict tensors in key order), its frontend
    and encoder settings, the sslaudio version and `options` (what else changes the numbers), with
    the pooling set_pool chose (absent by default, so identities from before the option stay valid)."""
    p = bundle.preset
    if getattr(bundle, "pool", None) is not None:
        options = options | {"pool": "+".join(bundle.pool)}
    h = hashlib.sha256(json.dumps({"frontend": p.frontend, "encoder": p.encoder, "sample_rate": p.data.sample_rate,
                                   "version": __version__, "options": options}, sort_keys=True,
                                  default=str).encode())
    h.update(tensors_sha256(bundle.state_dict()).encode())  # the weights, hashed as checkpoints hash them
    return h.hexdigest()[:32]


def output_names(rel: str, fmt: str, frames: bool, all_layers: bool = False) -> list[str]:
    """The files (relative to FEATS) one input's features are written to."""
    if fmt == "safetensors":
        return [rel + ".safetensors"]
    suffixes = [""] + ([".frames", ".timestamps"] if frames else [])
    suffixes += ([".layer_clips"] + ([".layers"] if frames else [])) if all_layers else []
    return [rel + s + ".npy" for s in suffixes] + [rel + ".json"]


def check_collisions(items: list[tuple[str, str]], fmt: str, frames: bool, all_layers: bool = False) -> None:
    """Raise OutputCollision if two different inputs would be written to the same file."""
    owner: dict[str, str] = {}
    for path, rel in items:
        for name in output_names(rel, fmt, frames, all_layers):
            key = os.path.normpath(name)
            if key in owner and owner[key] != path:
                raise OutputCollision(f"{owner[key]} and {path} would both be written to {name}; give their "
                                      f"folders or a manifest instead, or extract them into separate --out folders")
            owner[key] = path


def remove_temp_files(out_dir: Path) -> int:
    """Delete the temp files (.NAME.XXXXXXXX.tmp) an interrupted run left under out_dir."""
    n = 0
    for root, _, files in os.walk(out_dir):
        for name in files:
            if TEMP_NAME.match(name):
                try:
                    os.unlink(os.path.join(root, name))
                    n += 1
                except FileNotFoundError:
                    pass
    return n


def _text(s: str) -> str:
    """A str that any UTF-8 writer accepts (non-UTF-8 file names as \\x escapes)."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _source_stamp(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def write_embedding(e: Embedding, out_dir: Path, fmt: str, meta: dict[str, str]) -> list[str]:
    """FEATS/<rel>.safetensors ('clip', 'frames', 'timestamps', with every layer also 'layer_clips'
    and 'layers'; `meta` and the source path in its metadata), or <rel>.npy (+ .frames.npy,
    .timestamps.npy, .layer_clips.npy, .layers.npy) and <rel>.json holding the metadata
    (written last, so its presence means the .npy files are complete). Returns the written paths
    relative to out_dir."""
    base = out_dir / e.rel
    meta = {**meta, "source": _text(e.path), "seconds": repr(float(e.seconds)), "clip_dim": str(e.clip.shape[0]),
            "frames": str(0 if e.frames is None else int(e.frames.shape[0]))}
    if e.layer_clips is not None:
        meta["layers"] = str(int(e.layer_clips.shape[0]))
    if fmt == "safetensors":
        tensors = {"clip": e.clip.astype(np.float32)}
        if e.frames is not None:
            tensors["frames"] = np.ascontiguousarray(e.frames, dtype=np.float32)
            tensors["timestamps"] = e.times.astype(np.float32)
        if e.layer_clips is not None:
            tensors["layer_clips"] = np.ascontiguousarray(e.layer_clips, dtype=np.float32)
        if e.layers is not None:
            tensors["layers"] = np.ascontiguousarray(e.layers, dtype=np.float32)
        target = base.with_name(base.name + ".safetensors")
        atomic_write(target, lambda t: save_file(tensors, t, metadata=meta))
        return [str(target.relative_to(out_dir))]
    sidecar = base.with_name(base.name + ".json")
    sidecar.unlink(missing_ok=True)  # absent until every array below is in place
    written = []
    arrays = [("", e.clip)] + ([(".frames", e.frames), (".timestamps", e.times)] if e.frames is not None else [])
    arrays += [(s, a) for s, a in ((".layer_clips", e.layer_clips), (".layers", e.layers)) if a is not None]
    for suffix, arr in arrays:
        target = base.with_name(base.name + suffix + ".npy")

        def write(t, arr=arr):
            with open(t, "wb") as f:
                np.save(f, arr.astype(np.float32))

        atomic_write(target, write)
        written.append(str(target.relative_to(out_dir)))
    atomic_write(sidecar, lambda t: Path(t).write_text(json.dumps(meta, indent=1)))
    return written + [str(sidecar.relative_to(out_dir))]


def _existing(out_dir: Path, path: str, rel: str, fmt: str, frames: bool, identity: str, stamp: str | None,
              all_layers: bool = False) -> tuple[str, dict | None]:
    """('same', manifest row) when out_dir holds this input's complete outputs of this identity and
    source file version; ('other', None) when it holds outputs of something else; ('none', None)."""
    names = output_names(rel, fmt, frames, all_layers)
    meta_file = out_dir / names[0] if fmt == "safetensors" else out_dir / names[-1]
    if not any(os.path.lexists(out_dir / n) for n in names):
        return "none", None
    try:
        if fmt == "safetensors":
            with safe_open(str(meta_file), framework="np") as f:
                meta = f.metadata() or {}
        else:
            meta = json.loads(meta_file.read_text())
        complete = all((out_dir / n).is_file() for n in names)
        same = (complete and meta.get("identity") == identity and stamp is not None
                and meta.get("source_stat") == stamp and meta.get("source") == _text(path))
        if same:
            return "same", {"path": path, "outputs": names, "seconds": round(float(meta["seconds"]), 4),
                            "frames": int(meta["frames"]), "clip_dim": int(meta["clip_dim"])}
    except Exception:  # unreadable, not ours, or from an older sslaudio: replaced
        pass
    return "other", None


def _nbytes(e: Embedding) -> int:
    return sum(a.nbytes for a in (e.clip, e.frames, e.times, e.layer_clips, e.layers) if a is not None)


def extract(bundle: EncoderBundle, items: list[tuple[str, str]], out_dir: Path | None, frames: bool, fmt: str,
            device: torch.device, batch_size: int, encoder_id: str, on_skip=None, on_file=None, on_warn=None,
            chunk_seconds: float = 30.0, all_layers: bool = False,
            batch_seconds: float | None = None, workers: int = 1) -> dict:
    """Write features for `items` (path, output name) under out_dir (None: JSON lines on stdout).
    `all_layers` and `batch_seconds`: see the module docstring; `workers` threads decode
    ahead of the encoder. Returns the summary. Entries listed twice are processed once (one `on_warn` line each); two
    inputs with one output name raise OutputCollision before anything is written. A rerun into the
    same out_dir resumes (see the module docstring)."""
    t0 = time.time()
    warn = on_warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    items, dups = dedupe(items)
    for path, times in dups:
        warn(f"{path}: listed {times} times; processed once")
    order = {rel: i for i, (_, rel) in enumerate(items)}
    first_of = {}
    for i, (path, _) in enumerate(items):
        first_of.setdefault(path, i)
    errors: list[tuple[int, dict]] = []

    def skip(path: str, reason: str) -> None:
        errors.append((first_of.get(path, len(items)), {"path": path, "error": reason}))
        (on_skip or (lambda p, r: print(f"skip {p}: {r}", file=sys.stderr)))(path, reason)

    temp_removed = 0
    if out_dir is not None:
        check_collisions(items, fmt, frames, all_layers)
        if out_dir.is_dir():
            temp_removed = remove_temp_files(out_dir)
            if temp_removed:
                warn(f"removed {temp_removed} unfinished temp file(s) an interrupted run left in {out_dir}")
    plan = plan_files(bundle, items, device, chunk_seconds, skip)
    if all_layers and bundle.layer is not None:
        raise ValueError("all_layers embeds every layer: the bundle must not have a layer set")
    layer = "all" if all_layers else bundle.layer
    identity = encoder_identity(bundle, frames=frames, layer=layer, format=fmt, chunk_seconds=chunk_seconds,
                                device=torch.device(device).type)
    meta = {"encoder": _text(encoder_id), "sample_rate": str(bundle.sample_rate), "identity": identity}
    rows: dict[str, dict] = {}  # output name -> manifest row
    stamps: dict[str, str | None] = {}
    other: set[str] = set()
    if out_dir is not None:
        for path, rel in plan.items():
            stamps[rel] = _source_stamp(path)
            state, row = _existing(out_dir, path, rel, fmt, frames, identity, stamps[rel], all_layers)
            if state == "same":
                rows[rel] = row
            elif state == "other":
                other.add(rel)
        if other:
            warn(f"{len(other)} existing output(s) in {out_dir} hold features of another encoder, other options "
                 f"or an older version of their audio file: they are replaced")
    reused = len(rows)
    replaced = printed = 0
    dim = next((r["clip_dim"] for r in rows.values()), None)
    # feature files are written by one thread behind the encoder (mkstemp, serialise, rename: ~0.7 ms
    # a file, a fifth of a small encoder's time), at most WRITE_AHEAD files behind; a write's error
    # comes out here, in order, and nothing is left half-written either way (atomic_write)
    writer = ThreadPoolExecutor(1, thread_name_prefix="sslaudio-write") if out_dir is not None else None
    pending: deque[tuple[Embedding, Future]] = deque()
    held = 0  # bytes of the pending features

    def settle(files: int, nbytes: int) -> None:
        nonlocal replaced, held
        while pending and (len(pending) > files or held > nbytes):
            e, future = pending.popleft()
            held -= _nbytes(e)
            outputs = future.result()
            replaced += e.rel in other
            rows[e.rel] = {"path": e.path, "outputs": outputs, "seconds": round(e.seconds, 4),
                           "frames": 0 if e.frames is None else int(e.frames.shape[0]), "clip_dim": int(e.clip.shape[0])}
            if on_file:
                on_file(e)

    try:
        for e in run_plan(bundle, plan, device, frames, batch_size, skip, done=set(rows), all_layers=all_layers,
                          batch_seconds=batch_seconds, workers=workers):
            if not all(np.isfinite(a).all() for a in (e.clip, e.frames, e.layer_clips, e.layers) if a is not None):
                skip(e.path, "the encoder's output is not finite")
                continue
            dim = int(e.clip.shape[0])
            if writer is not None:
                pending.append((e, writer.submit(write_embedding, e, out_dir, fmt,
                                                 {**meta, "source_stat": stamps.get(e.rel) or ""})))
                held += _nbytes(e)
                settle(*WRITE_AHEAD)
                continue
            row = {"path": e.path, "clip": [round(float(v), 6) for v in e.clip]}
            if e.frames is not None:
                row["frames"] = np.round(e.frames, 6).tolist()
                row["timestamps"] = np.round(e.times, 4).tolist()
            if e.layer_clips is not None:
                row["layer_clips"] = np.round(e.layer_clips, 6).tolist()
            if e.layers is not None:
                row["layers"] = np.round(e.layers, 6).tolist()
            sys.stdout.write(json.dumps(row) + "\n")
            sys.stdout.flush()
            printed += 1
            if on_file:
                on_file(e)
        settle(0, 0)
    finally:
        if writer is not None:  # on an error or an interrupt: the writes not started are dropped
            for _, future in pending:
                future.cancel()
            writer.shutdown(wait=True)
    errors.sort(key=lambda x: x[0])
    summary = {"files": len(items), "written": len(rows) + printed, "reused": reused, "skipped": len(errors),
               "duplicates": len(dups), "replaced": replaced, "temp_removed": temp_removed,
               "clip_dim": dim, "encoder": encoder_id, "identity": identity, "format": fmt, "frames": frames,
               "layer": layer, "pool": "+".join(bundle.clip_stats), "time_s": round(time.time() - t0, 3)}
    if out_dir is not None:
        manifest = [{k: v for k, v in rows[rel].items() if k != "clip_dim"} for rel in sorted(rows, key=order.get)]
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, lines in (("manifest.jsonl", manifest), ("errors.jsonl", [r for _, r in errors])):
            atomic_write(out_dir / name,
                         lambda t, lines=lines: Path(t).write_text("".join(json.dumps(r) + "\n" for r in lines)))
        atomic_write(out_dir / "summary.json", lambda t: Path(t).write_text(json.dumps(summary, indent=1)))
    return summary
