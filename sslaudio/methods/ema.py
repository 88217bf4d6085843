"""EMA teachers: momentum schedules as pure functions of the step, and one foreach update."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sslaudio.config import ConfigError


@dataclass
class EMAConfig:
    """Momentum tau for `teacher = tau * teacher + (1 - tau) * student`.

    cosine (BYOL, Grill et al. 2020): tau = end - (end - start) * (cos(pi k / K) + 1) / 2.
    linear (data2vec): start -> end over `steps` updates (0: the whole run), then constant.
    constant: tau = start (BYOL-A keeps 0.99).
    """

    start: float = 0.99
    end: float = 1.0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    steps: int = 0

    def __post_init__(self):
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0):
            raise ConfigError("method.ema: start and end must be in [0, 1]")


def momentum(cfg: EMAConfig, step: int, max_steps: int) -> float:
    if cfg.schedule == "constant":
        return cfg.start
    total = cfg.steps or max_steps
    frac = min(step / max(total, 1), 1.0)
    if cfg.schedule == "linear":
        return cfg.start + (cfg.end - cfg.start) * frac
    return cfg.end - (cfg.end - cfg.start) * (math.cos(math.pi * frac) + 1) / 2


def make_teacher(module: nn.Module) -> nn.Module:
    """A frozen copy of `module`: no gradients ever reach it."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, tau: float) -> None:
    """teacher <- tau * teacher + (1 - tau) * student for parameters (one foreach lerp: one pass
    over the teacher's memory, teacher + (1 - tau) * (student - teacher)); buffers are copied."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if tau >= 1.0:
        return
    torch._foreach_lerp_(t_params, s_params, 1.0 - tau)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)
