"""Training throughput of data2vec 2.0 vs data2vec at equal model size.

data2vec 2.0's claim (Baevski et al. 2023) is efficiency: the teacher (and the conv feature
extractor) run once per clip for `clone_batch` K differently masked student copies, and the
student encodes only the visible frames. This script builds both methods from their presets
(the waveform tiny presets by default, `--size tiny-mel` for the log-mel ViT tiny presets,
`--size base` for the 12 x 768 paper models, whose encoders are identical),
trains N optimizer steps on random waveforms (forward + backward + AdamW step + EMA update), and
prints steps/s, audio seconds/s (clips consumed) and masked student views/s (clips x K: the
training examples a step learns from), each as a ratio to data2vec, and the FLOPs of a step
(forward + backward, torch.utils.flop_counter) with its FLOP rate as a fraction of the attained
matmul rate measured in the same run.

    OMP_NUM_THREADS=1 python benchmarks/data2vec_speed.py                # tiny presets
    OMP_NUM_THREADS=1 python benchmarks/data2vec_speed.py --batch 8 --steps 20
    OMP_NUM_THREADS=1 python benchmarks/data2vec_speed.py --size tiny-mel --batch 16 --steps 20
    python benchmarks/data2vec_speed.py --size base --seconds 4 --batch 4 --device cuda

`--batch` sets one batch size for both (default: each preset's own). Wall-clock rates are
printed alongside CPU-time rates (process time), which are less sensitive to other load on a
shared CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from flops import count_flops, default_matmul, matmul_rate  # benchmarks/flops.py

from sslaudio import optim
from sslaudio.build import build_method, load_preset


def measure(preset_name: str, overrides: list[str], steps: int, warmup: int, device: str) -> dict:
    preset = load_preset(preset_name, overrides)
    torch.manual_seed(0)
    method = build_method(preset).to(device).train()
    opt = optim.adamw(method.param_groups(preset.optim.weight_decay), preset.optim, lr=1e-4)
    B, seconds = preset.train.batch_size, preset.data.clip_seconds
    audio = torch.randn(B, 1, int(seconds * preset.data.sample_rate), device=device) * 0.1
    use_bf16 = device.startswith("cuda")

    def fwd_bwd(i: int) -> None:
        gen = torch.Generator(device).manual_seed(i)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16):
            out = method({"audio": audio}, i, gen, preset.train.steps)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()

    def step(i: int) -> None:
        fwd_bwd(i)
        opt.step()
        method.after_step(i, preset.train.steps)

    for i in range(warmup):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + steps):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    K = getattr(method.cfg, "clone_batch", 1)
    sps = steps / wall
    flops = count_flops(lambda: fwd_bwd(warmup + steps))
    return {"gflop": flops / 1e9, "flop_rate": flops * sps, "method": preset.method["name"], "batch": B, "K": K, "seconds": seconds,
            "params_M": sum(p.numel() for p in method.parameters() if p.requires_grad) / 1e6,
            "steps_s": sps, "cpu_steps_s": steps / cpu, "audio_s": sps * B * seconds,
            "views_s": sps * B * K, "cpu_views_s": steps / cpu * B * K}


PAIRS = {"tiny": ("tiny/data2vec-wave", "tiny/data2vec2-wave"), "tiny-mel": ("tiny/data2vec", "tiny/data2vec2"),
         "base": ("data2vec", "data2vec2")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(PAIRS), default="tiny",
                    help="tiny: the waveform tiny presets; tiny-mel: the log-mel ViT ones; base: paper scale")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0, help="one batch size for both (0: each preset's)")
    ap.add_argument("--seconds", type=float, default=0.0, help="crop length (0: the presets')")
    ap.add_argument("--clone", type=int, default=0, help="data2vec 2.0 clone_batch (0: the preset's)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    common = [f"train.batch_size={args.batch}"] if args.batch else []
    if args.seconds:
        common.append(f"data.clip_seconds={args.seconds}")
    v2 = common + ([f"method.clone_batch={args.clone}"] if args.clone else [])
    v1_name, v2_name = PAIRS[args.size]
    mm_n, mm_dtype = default_matmul(args.device)
    mm_rate = matmul_rate(mm_n, 5, args.device, mm_dtype)
    rows = [measure(v1_name, common, args.steps, args.warmup, args.device),
            measure(v2_name, v2, args.steps, args.warmup, args.device)]

    base = rows[0]
    print(f"# {args.size} presets, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{args.steps} timed steps after {args.warmup} warm-up; attained matmul rate {mm_rate / 1e9:.1f} GFLOP/s "
          f"({mm_n} x {mm_n} {str(mm_dtype)[6:]})")
    print(f"{'method':<10} {'params':>7} {'batch':>5} {'K':>2} {'clip s':>6} {'steps/s':>8} "
          f"{'audio s/s':>9} {'views/s':>8} {'cpu steps/s':>11} {'cpu views/s':>11} "
          f"{'x audio':>7} {'x views':>7} {'x cpu views':>11} {'GFLOP/step':>10} {'of matmul':>9}")
    for r in rows:
        print(f"{r['method']:<10} {r['params_M']:>6.2f}M {r['batch']:>5} {r['K']:>2} {r['seconds']:>6.2f} "
              f"{r['steps_s']:>8.2f} {r['audio_s']:>9.1f} {r['views_s']:>8.1f} {r['cpu_steps_s']:>11.2f} "
              f"{r['cpu_views_s']:>11.1f} {r['audio_s'] / base['audio_s']:>7.2f} "
              f"{r['views_s'] / base['views_s']:>7.2f} {r['cpu_views_s'] / base['cpu_views_s']:>11.2f} "
              f"{r['gflop']:>10.1f} {r['flop_rate'] / mm_rate:>9.2f}")


if __name__ == "__main__":
    main()
