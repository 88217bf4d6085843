"""Peak memory of the frame-level (SED) linear probe, on synthetic frame embeddings.

    python benchmarks/probe_memory.py --files 600 --seconds 10 --dim 2048
    PYTHONPATH=/path/to/other/checkout python benchmarks/probe_memory.py ...   # the same for another version

Builds `--files` clips of `--seconds` with encoder frames every `--frame-hop` seconds of width
`--dim` (float32, what extract gives), averages them onto the probe's 100 ms grid (probe.to_grid)
and runs the train/valid/test SED probe (probe.evaluate_events, 10 classes). Prints the features'
own size, the process's peak resident memory before and after the probe, and their ratio, so two
versions of the probe can be compared by what they hold beyond the features. The labels are random:
the scores mean nothing, the memory and the time do.
`--epochs 25` (one evaluation) keeps the memory and cuts the time when only the memory matters.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from sslaudio import probe


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=600)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--frame-hop", type=float, default=0.16, help="seconds between encoder frames (0.16: 16 x 16 ViT)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=probe.EPOCHS,
                    help="the probe's full-batch epochs, at least EVAL_EVERY (fewer: the same memory, less time)")
    a = ap.parse_args()
    if a.files < 5:
        ap.error("--files must be at least 5 (two train, two valid, one test in every five)")
    if min(a.dim, a.classes) < 1 or a.frame_hop <= 0:
        ap.error("--dim and --classes must be at least 1, --frame-hop above 0")
    if a.epochs < probe.EVAL_EVERY:
        ap.error(f"--epochs must be at least {probe.EVAL_EVERY}: the probe evaluates every {probe.EVAL_EVERY} epochs")
    if a.seconds < max(a.frame_hop, 0.1):
        ap.error("--seconds must hold one encoder frame and one 100 ms grid frame")
    probe.EPOCHS = a.epochs
    rng = np.random.default_rng(0)
    n_frames = int(a.seconds / a.frame_hop)
    times = (np.arange(n_frames) + 0.5) * a.frame_hop
    frames = [rng.standard_normal((n_frames, a.dim), dtype=np.float32) for _ in range(a.files)]
    features_mib = sum(f.nbytes for f in frames) / 2**20
    base = peak_mib()
    t0 = time.perf_counter()
    grids = [probe.to_grid(f, times, a.seconds, 0.1) for f in frames]
    targets = [(rng.random((len(g), a.classes)) < 0.1).astype(np.float32) for g in grids]
    splits = [("train", "valid", "test")[min(2, i % 5 // 2)] for i in range(a.files)]  # 2:2:1
    res = probe.evaluate_events(grids, targets, splits, [f"c{i}" for i in range(a.classes)])
    secs = time.perf_counter() - t0
    grid_mib = sum(g.size for g in grids) * 4 / 2**20  # as float32, whatever dtype they have
    print(f"{a.files} files x {n_frames} frames x {a.dim} (float32 frames {features_mib:.0f} MiB; "
          f"100 ms grids {grid_mib:.0f} MiB in float32, here {grids[0].dtype}, {res['frames_train']} training frames)")
    print(f"peak RSS before the probe {base:.0f} MiB, after {peak_mib():.0f} MiB: "
          f"{(peak_mib() - base) / grid_mib:.2f} x the grids' float32 size beyond the frames; {secs:.1f} s")


if __name__ == "__main__":
    main()
