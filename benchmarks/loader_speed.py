#!/usr/bin/env python
"""Data loader against model consumption, with and without `--cache`; start-up time on many files.

    python benchmarks/loader_speed.py                      # synthesized folders, CPU
    python benchmarks/loader_speed.py /data/audio --startup-files 0

1. The model: audio seconds per second a training step of each of `--presets` consumes (forward,
   backward, optimizer; benchmarks/throughput.py, 1 thread); the fastest one sets the loader's
   batch size, crop length and sample rate, and is the yardstick.
2. The loader: audio seconds per second `data.loader` delivers with 0, 1, 2 workers, decoding
   (resampling each crop) and reading from a cache (built first, timed), on FOLDER or on
   `--files` synthesized files of 2-10 s at 22.05 and 44.1 kHz (so resampling is exercised).
   Each figure is the steady state: batches after the first, for `--seconds` seconds.
3. Start-up, as `sslaudio pretrain` does it before the first step (scan, probe every file,
   CropDataset.open, the normalisation statistics sample), each in a fresh process with torch's
   default threads, on
   `--startup-files` synthesized files of 1-3 s: cold (the first run; with --cache it builds
   the cache) and warm (the same again). "cold" is the first run after the files were written,
   so the page cache is warm either way: it is the work done, not the disk, that is compared.
   The last row validates through the cache's index (`validate(..., cache=DIR)`: an os.stat per
   file instead of a probe).

Prints Markdown tables; the machine load (os.getloadavg) is printed with them, as other
processes sharing the cores change the absolute figures more than the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from sslaudio.build import load_preset
from sslaudio.data import CropDataset, loader, scan, validate


def synthesize(root: Path, count: int, low: float, high: float, seed: int = 0) -> None:
    """`count` PCM16 files of low..high s: noise bursts and tones, alternately 22.05 and 44.1 kHz
    (a few stereo)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        sr = 44100 if i % 2 else 22050
        n = int(sr * rng.uniform(low, high))
        t = np.arange(n) / sr
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(n)
        if i % 7 == 0:
            x = np.stack([x, 0.5 * x], 1)
        path = root / f"{i // 500:03d}" / f"{i:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), x.astype(np.float32), sr, subtype="PCM_16")


def loader_rate(dataset: CropDataset, batch: int, workers: int, seconds: float) -> float:
    """Audio seconds per second delivered after the first batch (worker start-up excluded)."""
    per_batch = batch * dataset.segments * dataset.n / dataset.sample_rate
    it = iter(loader(dataset, batch, seed=0, start_step=0, steps=1 << 20, num_workers=workers))
    next(it)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        next(it)
        n += 1
    dt = time.perf_counter() - t
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    return n * per_batch / dt


_STARTUP = """
import json, sys, time
t0 = time.perf_counter()
from sslaudio.build import load_preset
from sslaudio.data import CropDataset, sample_for_stats, scan, validate
p = load_preset(sys.argv[1], [f"data.norm_samples={sys.argv[4]}"])
t1 = time.perf_counter()
cache = sys.argv[3] if sys.argv[3] != "-" else None
infos, skipped = validate(scan([sys.argv[2]]), p.data.min_seconds, lambda m: None,
                          cache=cache if sys.argv[5] == "index" else None)
t2 = time.perf_counter()
ds = CropDataset.open(infos, p.data, p.seed, cache, None, lambda m: None)
t3 = time.perf_counter()
sample_for_stats(ds, p.data.norm_samples, p.seed)
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "scan_probe": t2 - t1, "open": t3 - t2, "stats": t4 - t3, "total": t4 - t1,
                  "files": len(infos)}))
"""


def startup(preset: str, folder: Path, cache: Path | None, norm_samples: int, index: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", _STARTUP, preset, str(folder), str(cache) if cache else "-",
                          str(norm_samples), "index" if index else "probe"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_line() -> str:
    return "load average {:.2f} {:.2f} {:.2f} on {} cores".format(*os.getloadavg(), os.cpu_count())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", help="audio to load (default: --files synthesized files)")
    ap.add_argument("--files", type=int, default=400, help="synthesized files of 2-10 s for the loader")
    ap.add_argument("--startup-files", type=int, default=4000, help="synthesized files of 1-3 s for start-up (0: skip)")
    ap.add_argument("--norm-samples", type=int, default=256, help="start-up: data.norm_samples (the default "
                    "of DataConfig; the tiny presets use 16-128)")
    ap.add_argument("--presets", nargs="*", default=["tiny/npc", "tiny/atst-clip"])
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--seconds", type=float, default=4.0, help="time per loader figure")
    ap.add_argument("--steps", type=int, default=5, help="timed model steps")
    a = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the model's side, timed as throughput.py times it
    from throughput import measure

    tmp = Path(tempfile.mkdtemp(prefix="loader-speed-"))
    try:
        print(load_line())
        models = [measure(name, "cpu", a.steps, 2, []) for name in a.presets]
        print("\n| preset | batch | crop s | model audio s/s (1 thread) |\n|---|---|---|---|")
        for m in models:
            print(f"| {m['preset']} | {m['batch']} | {m['clip_s']:.2f} | {m['audio_s_per_s']:.1f} |")
        best = max(models, key=lambda m: m["audio_s_per_s"])
        p = load_preset(best["preset"])
        folder = Path(a.folder) if a.folder else tmp / "audio"
        if not a.folder:
            t = time.perf_counter()
            synthesize(folder, a.files, 2.0, 10.0)
            print(f"\nsynthesized {a.files} files of 2-10 s at 22.05 / 44.1 kHz in {time.perf_counter() - t:.1f} s")
        infos, _ = validate(scan([str(folder)]), p.data.min_seconds, lambda m: None)
        hours = sum(i.seconds for i in infos) / 3600
        t = time.perf_counter()
        cached = CropDataset.open(infos, p.data, p.seed, tmp / "cache", None, lambda m: None)
        build = time.perf_counter() - t
        size = sum(f.stat().st_size for f in (tmp / "cache").iterdir()) / 2**20
        print(f"{len(infos)} files, {hours:.2f} h; cache build {build:.1f} s with {p.data.num_workers} thread(s) "
              f"({hours * 3600 / build:.0f} audio s/s), {size:.0f} MiB")
        plain = CropDataset(infos, p.data.sample_rate, p.data.clip_seconds, p.data.segments, p.seed)
        print(f"\nloader, {best['preset']} batches ({p.train.batch_size} x {p.data.segments} x {p.data.clip_seconds} s "
              f"at {p.data.sample_rate} Hz); model: {best['audio_s_per_s']:.1f} audio s/s; {load_line()}\n")
        print("| workers | decoded audio s/s | x model | cached audio s/s | x model |\n|---|---|---|---|---|")
        for w in a.workers:
            r_plain = loader_rate(plain, p.train.batch_size, w, a.seconds)
            r_cached = loader_rate(cached, p.train.batch_size, w, a.seconds)
            print(f"| {w} | {r_plain:.0f} | {r_plain / best['audio_s_per_s']:.1f} | {r_cached:.0f} | "
                  f"{r_cached / best['audio_s_per_s']:.1f} |", flush=True)
        if a.startup_files:
            many = tmp / "many"
            t = time.perf_counter()
            synthesize(many, a.startup_files, 1.0, 3.0, seed=1)
            print(f"\nstart-up on {a.startup_files} files of 1-3 s ({best['preset']}: norm_samples "
                  f"{a.norm_samples}; written in {time.perf_counter() - t:.0f} s); {load_line()}\n")
            print("| run | scan + probe s | dataset open s | stats sample s | total s | (imports + preset s) |")
            print("|---|---|---|---|---|---|")
            runs = [("no cache, cold", None, False), ("no cache, warm", None, False),
                    ("--cache, cold", tmp / "cache-many", False), ("--cache, warm", tmp / "cache-many", False),
                    ("--cache, warm, validate(cache=DIR)", tmp / "cache-many", True)]
            for label, cache, index in runs:
                r = startup(best["preset"], many, cache, a.norm_samples, index)
                print(f"| {label} | {r['scan_probe']:.2f} | {r['open']:.2f} | {r['stats']:.2f} | "
                      f"{r['total']:.2f} | {r['import']:.1f} |", flush=True)
        print(f"\n{load_line()}")
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
