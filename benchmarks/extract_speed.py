#!/usr/bin/env python
"""End-to-end `extract` against the encoder's forward pass alone, on the same audio.

    python benchmarks/extract_speed.py random:tiny/byol-a /work/devbench-small/words/audio --workers 1
    python benchmarks/extract_speed.py RUN FOLDER --long          # also peak memory: a 10 s and a 1 h file

End to end: `features.extract` into a temporary folder (scan and header checks, decoding and
resampling, frontend, encoder, safetensors writes). Forward only: the same files decoded into
memory first, then only `bundle.embed` on the same batches (equal lengths together, as extract
batches them). Both report audio seconds per second; the ratio is the share of the forward-pass
ceiling that extraction reaches. The two passes alternate `--repeats` times after one untimed
warm-up of each (first-call kernel setup, file caches) and the table reports the fastest of each,
with the ratio of every repeat beside it: one pass of each swings by up to 50 % on a shared
machine, the fastest of several does not. With --long, a subprocess per file length extracts one
synthetic file and reports its peak resident memory (ru_maxrss), which should not grow with the
file's length (long files are read and encoded in chunks). The FLOPs of the forward passes
(torch.utils.flop_counter) give both passes' FLOP rate as a fraction of the attained fp32 matmul
rate measured in the same run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from flops import count_flops, default_matmul, matmul_rate  # benchmarks/flops.py

from sslaudio.audio import load
from sslaudio.data import scan_pairs
from sslaudio.features import extract, plan_files
from sslaudio.inference import load_encoder


def decoded_batches(bundle, items, batch_size: int) -> list[torch.Tensor]:
    """The files of `items` decoded into memory, in the batches extract forms (equal lengths together)."""
    plan = plan_files(bundle, items, torch.device("cpu"), 30.0)
    sr, batches = bundle.sample_rate, []
    for key in sorted(plan.groups):
        members = plan.groups[key]
        for i in range(0, len(members), batch_size):
            batches.append(torch.stack([load(p, sr) for p, _ in members[i:i + batch_size]]))
    return batches


def forward_only(bundle, batches: list[torch.Tensor]) -> float:
    """Seconds of `bundle.embed` over `batches`."""
    spent = 0.0
    for x in batches:
        t = time.perf_counter()
        with torch.inference_mode():
            bundle.embed(x)
        spent += time.perf_counter() - t
    return spent


def end_to_end(bundle, items, a) -> tuple[float, dict]:
    """Seconds of `features.extract` of `items` into a temporary folder, and its summary."""
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        summary = extract(bundle, items, Path(d) / "feats", True, "safetensors", torch.device("cpu"), a.batch_size,
                          a.ckpt, workers=a.workers)
        return time.perf_counter() - t, summary


def peak_rss(ckpt: str, seconds: float) -> float:
    """MiB of peak resident memory of a subprocess extracting one synthetic file of `seconds`."""
    code = f"""
import resource, tempfile, numpy as np, soundfile as sf, torch
from pathlib import Path
from sslaudio.features import extract
from sslaudio.inference import load_encoder
torch.set_num_threads(1)
d = Path(tempfile.mkdtemp())
sr = 16000
with sf.SoundFile(str(d / "long.wav"), "w", sr, 1, "PCM_16") as f:
    rng = np.random.default_rng(0)
    for _ in range(int({seconds} // 10) or 1):
        f.write((0.1 * rng.standard_normal(sr * min(10, int({seconds})))).astype(np.float32))
b = load_encoder({ckpt!r}); b.needs_stats = False
extract(b, [(str(d / "long.wav"), "long.wav")], d / "out", True, "safetensors", torch.device("cpu"), 16, "x")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-files", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of each, alternating (the fastest counts)")
    ap.add_argument("--long", action="store_true", help="also peak memory for a 10 s and a 1 h file")
    a = ap.parse_args()
    if a.repeats < 1:
        ap.error(f"--repeats must be at least 1, found {a.repeats}")
    torch.set_num_threads(a.threads)
    bundle = load_encoder(a.ckpt)
    bundle.needs_stats = False  # the same numbers in both passes
    items = scan_pairs(a.inputs)[: a.max_files]
    mm_n, mm_dtype = default_matmul("cpu")
    mm_rate = matmul_rate(mm_n, 5, "cpu", mm_dtype)
    batches = decoded_batches(bundle, items, a.batch_size)  # also warms the decoder's file caches
    audio_s = sum(x.shape[0] * x.shape[1] for x in batches) / bundle.sample_rate
    with torch.inference_mode():  # counted apart from the timing (the counter slows the pass)
        flops = sum(count_flops(lambda x=x: bundle.embed(x)) for x in batches)
    forward_only(bundle, batches)  # untimed warm-up of both passes
    end_to_end(bundle, items, a)
    fwds, e2es = [], []
    for _ in range(a.repeats):
        fwds.append(forward_only(bundle, batches))
        e2e, summary = end_to_end(bundle, items, a)
        e2es.append(e2e)
    fwd, e2e = min(fwds), min(e2es)
    print(f"{len(items)} files, {audio_s:.0f} s of audio, {summary.get('written')} written, "
          f"{a.threads} thread(s), --workers {a.workers}, batch {a.batch_size}; {flops / 1e9:.1f} GFLOP of "
          f"forward passes, attained matmul rate {mm_rate / 1e9:.1f} GFLOP/s; fastest of {len(fwds)} alternating "
          f"passes each (forward-only / end-to-end ratio per repeat: "
          f"{', '.join(f'{f / e:.2f}' for f, e in zip(fwds, e2es))})\n")
    print("| pass | seconds | audio s/s | of forward-only | FLOP rate of matmul rate |")
    print("|---|---|---|---|---|")
    print(f"| forward only (decoded beforehand) | {fwd:.2f} | {audio_s / fwd:.0f} | 1.00 | {flops / fwd / mm_rate:.2f} |")
    print(f"| extract end to end | {e2e:.2f} | {audio_s / e2e:.0f} | {fwd / e2e:.2f} | {flops / e2e / mm_rate:.2f} |")
    if a.long:
        print("\n| file | peak RSS (MiB) |\n|---|---|")
        for s in (10.0, 3600.0):
            print(f"| {s:.0f} s | {peak_rss(a.ckpt, s):.0f} |")


if __name__ == "__main__":
    main()
