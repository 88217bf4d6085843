"""FLOP accounting shared by the benchmark scripts: the attained matmul rate of this device, the
FLOPs of a callable (torch.utils.flop_counter: matmuls, convolutions, attention; element-wise work
is not counted), and the bf16 dense peak of known GPUs for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# dense bf16 tensor-core peak, TFLOP/s (vendor data sheets; SXM unless named)
BF16_PEAK_TFLOPS = [("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0)]


def sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(n: int, reps: int, device: str | torch.device, dtype: torch.dtype) -> float:
    """Attained FLOP/s of n x n torch.matmul (2 n^3 each), best of `reps` after one warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    sync(device)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def default_matmul(device: str | torch.device) -> tuple[int, torch.dtype]:
    """The matmul size and dtype the training steps run in: fp32 on the CPU, bf16 under CUDA. On the
    CPU 4096 x 4096 (0.75 s each on 2 cores): the best of five 2048 x 2048 products read 160-195
    GFLOP/s in repeats a minute apart on the project machine, 4096 x 4096 172-191."""
    return (8192, torch.bfloat16) if str(device).startswith("cuda") else (4096, torch.float32)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def bf16_peak(device: str | torch.device) -> float | None:
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None
