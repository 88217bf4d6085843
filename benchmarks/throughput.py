#!/usr/bin/env python
"""Training throughput per preset: optimizer steps/s and audio seconds/s on synthetic audio.

    python benchmarks/throughput.py                        # every tiny preset, CPU, 1 thread
    python benchmarks/throughput.py --presets tiny/m2d byol-a --device cuda --steps 20

Times forward + backward + optimizer step + after_step (EMA, queues) with the preset's batch size,
after warm-up steps; data loading is excluded (measure it with a real `sslaudio pretrain` run,
whose log.jsonl has steps_per_s and audio_h_per_s, or benchmarks/loader_speed.py). Prints a
Markdown table.

`--flops` adds the FLOPs of one step's forward + backward (torch.utils.flop_counter: matmuls,
convolutions, attention) and the FLOP rate as a fraction of the attained matmul rate (fp32 on the
CPU, bf16 on CUDA), and on a known GPU the model FLOPs utilisation against its bf16 dense peak. The
matmul rate is measured right before and right after each preset's timed steps and the fraction
divides by their mean: a shared machine's clock drifts over minutes (this project's CPU read
177-331 GFLOP/s in different runs), so one reference at the start of a long run would not be the
rate the step ran beside; both readings are printed, and a gap between them says the row is noisy.

    python benchmarks/throughput.py --presets data2vec wav2vec2 m2d data2vec2 --flops --threads 2 \
        --set train.batch_size=4 --set data.clip_seconds=2
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from flops import (  # benchmarks/flops.py
    bf16_peak,
    count_flops,
    default_matmul,
    matmul_rate,
)

from sslaudio import optim
from sslaudio.build import build_method, load_preset
from sslaudio.config import list_presets
from sslaudio.train import resolve_sources


def measure(name: str, device: str, steps: int, warmup: int, overrides: list[str], flops: bool = False) -> dict:
    # a method that reads other checkpoints (HuBERT's iteration 2, ATST-C2F's teachers) needs their
    # presets recorded, as the trainer does before a run
    p = resolve_sources(load_preset(name, overrides))
    dev = torch.device(device)
    torch.manual_seed(0)
    m = build_method(p).to(dev).train()
    opt = optim.adamw(m.param_groups(p.optim.weight_decay), p.optim)  # the trainer's optimizer
    n = round(p.data.clip_seconds * p.data.sample_rate)
    audio = (torch.randn(p.train.batch_size, p.data.segments, n, device=dev) * 0.1)
    # as the trainer before a new run: frontend statistics, HuBERT's k-means, DeepCluster's memory
    m.prepare(audio[:, 0], lambda count, batch: iter(audio[:, 0].repeat(-(-count // len(audio)), 1)[:count].split(batch)))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()

    def fwd_bwd(i):
        g = torch.Generator(dev).manual_seed(i)
        with amp:
            loss = m({"audio": audio}, i, g, steps + warmup)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def step(i):
        fwd_bwd(i)
        opt.step()
        m.after_step(i, steps + warmup)

    for i in range(warmup):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    params = sum(q.numel() for q in m.parameters() if q.requires_grad)
    n_flops = count_flops(lambda: fwd_bwd(warmup + steps)) if flops else 0
    return {"flops": n_flops, "s_per_step": dt, "preset": name, "batch": p.train.batch_size, "clip_s": p.data.clip_seconds * p.data.segments,
            "params_M": params / 1e6, "steps_per_s": 1 / dt,
            "audio_s_per_s": p.train.batch_size * p.data.segments * p.data.clip_seconds / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=None, help="default: every tiny preset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--flops", action="store_true", help="FLOPs per step and the fraction of the matmul rate")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = a.presets or [n for n in list_presets() if n.startswith("tiny/")]
    print(f"device {a.device}, {a.threads} thread(s), {a.steps} timed steps after {a.warmup} warm-up"
          + (f"; --set {' '.join(a.overrides)}" if a.overrides else ""))
    head, rule = "| preset | batch | crop s | params (M) | steps/s | audio s/s |", "|---|---|---|---|---|---|"
    peak = None
    if a.flops:
        mm_n, mm_dtype = default_matmul(a.device)
        peak = bf16_peak(a.device)
        print(f"matmul reference: {mm_n} x {mm_n} {str(mm_dtype)[6:]}, best of 5, before and after each preset"
              + (f"; bf16 dense peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
        head += " GFLOP/step | GFLOP/s | matmul GFLOP/s before, after | of matmul rate |" + (" MFU |" if peak else "")
        rule += "---|---|---|---|" + ("---|" if peak else "")
    print(f"\n{head}\n{rule}")
    for name in names:
        before = matmul_rate(mm_n, 5, a.device, mm_dtype) if a.flops else None
        r = measure(name, a.device, a.steps, a.warmup, a.overrides, a.flops)
        line = (f"| {r['preset']} | {r['batch']} | {r['clip_s']:.2f} | {r['params_M']:.2f} | "
                f"{r['steps_per_s']:.2f} | {r['audio_s_per_s']:.1f} |")
        if a.flops:
            after = matmul_rate(mm_n, 5, a.device, mm_dtype)
            rate = r["flops"] / r["s_per_step"]
            line += (f" {r['flops'] / 1e9:.1f} | {rate / 1e9:.1f} | {before / 1e9:.0f}, {after / 1e9:.0f} |"
                     f" {rate / ((before + after) / 2):.2f} |")
            line += f" {rate / peak:.3f} |" if peak else ""
        print(line, flush=True)


if __name__ == "__main__":
    main()
