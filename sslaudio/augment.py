"""View augmentations on batched log-mel spectrograms (B, F, T), on the training device.

Each augmentation is a registered module `forward(x, generator) -> x` whose random draws all come
from the passed generator, one draw per sample (no Python loop over samples). A preset's `views`
section is a list of augmentations applied in order to every view (`ViewChain`).

BYOL-A (Niizumi et al., IJCNN 2021; v2: TASLP 2023, github.com/nttcslab/byol-a) augmentations:
  mixup  log-mixup-exp with a FIFO memory of past inputs
  rrc    random resize crop in a virtual canvas, bicubic resize back
  rlf    random linear fader (v2): a linear gain slope in the log domain
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslaudio.config import ConfigError
from sslaudio.registry import AUGMENTS


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=g.device)


@AUGMENTS.register("mixup")
class Mixup(nn.Module):
    """BYOL-A mixup: x' = log((1 - a) exp(x) + a exp(z) + eps), a ~ U(0, ratio), z drawn from a
    memory of past inputs (official code: per-sample FIFO of `memory` items).

    Batched: every sample of a batch mixes with a memory item from earlier batches; the batch's own
    inputs enter the FIFO afterwards. The memory is a buffer, so it is checkpointed and a resumed
    run mixes with the same items.
    """

    @dataclass
    class Config:
        ratio: float = 0.4  # v1 paper 0.4; v2 code 0.2
        memory: int = 2048  # v1 2048; v2 code 512
        log_mixup_exp: bool = True

        def __post_init__(self):
            if not 0 <= self.ratio <= 1 or self.memory < 1:
                raise ConfigError("views.mixup: ratio must be in [0, 1] and memory >= 1")

    def __init__(self, cfg: Config, shape: tuple[int, int]):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("bank", torch.zeros(cfg.memory, *shape))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor, g: torch.Generator) -> Tensor:
        B = x.shape[0]
        alpha = _uniform(B, 0.0, self.cfg.ratio, g).view(B, 1, 1)
        idx = torch.randint(0, max(int(self.filled), 1), (B,), generator=g, device=g.device)
        if int(self.filled) > 0:
            z = self.bank[idx.to(self.bank.device)].to(x.dtype)
            if self.cfg.log_mixup_exp:
                mixed = torch.log((1 - alpha) * x.exp() + alpha * z.exp() + torch.finfo(x.dtype).eps)
            else:
                mixed = (1 - alpha) * x + alpha * z
        else:
            mixed = x
        self._push(x.detach())
        return mixed

    @torch.no_grad()
    def _push(self, x: Tensor) -> None:
        M = self.bank.shape[0]
        x = x[-M:]
        pos = (int(self.ptr) + torch.arange(x.shape[0], device=self.bank.device)) % M
        self.bank[pos] = x.to(self.bank.dtype)
        self.ptr.fill_((int(self.ptr) + x.shape[0]) % M)
        self.filled.fill_(min(M, int(self.filled) + x.shape[0]))


@AUGMENTS.register("rrc")
class RandomResizeCrop(nn.Module):
    """BYOL-A random resize crop: the input sits in the centre of a zero canvas `virtual_crop`
    times its size; a box of (freq_scale x F, time_scale x T), clipped to the canvas, is cropped at
    a random place and resized back to (F, T) with bicubic interpolation (align_corners, as the
    official F.interpolate call). Done for the whole batch with one grid_sample."""

    @dataclass
    class Config:
        virtual_crop: tuple[float, float] = (1.0, 1.5)
        freq_scale: tuple[float, float] = (0.6, 1.5)
        time_scale: tuple[float, float] = (0.6, 1.5)

    def __init__(self, cfg: Config, shape: tuple[int, int]):
        super().__init__()
        self.cfg = cfg

    def forward(self, x: Tensor, g: torch.Generator) -> Tensor:
        B, Fq, T = x.shape
        cf, ct = int(Fq * self.cfg.virtual_crop[0]), int(T * self.cfg.virtual_crop[1])
        h = (_uniform(B, *self.cfg.freq_scale, g) * Fq).floor().clamp(1, cf)
        w = (_uniform(B, *self.cfg.time_scale, g) * T).floor().clamp(1, ct)
        # integer top-left corner uniform in [0, canvas - size], as random.randint
        i = (torch.rand(B, generator=g, device=g.device) * (cf - h + 1)).floor()
        j = (torch.rand(B, generator=g, device=g.device) * (ct - w + 1)).floor()
        oy, ox = (cf - Fq) // 2, (ct - T) // 2  # where the input sits in the canvas
        dev = x.device
        r = torch.linspace(0, 1, Fq, device=dev)
        c = torch.linspace(0, 1, T, device=dev)
        # canvas coordinate of each output pixel, then input coordinate, then [-1, 1]
        ys = i.to(dev)[:, None] + r[None] * (h.to(dev)[:, None] - 1) - oy  # (B, F)
        xs = j.to(dev)[:, None] + c[None] * (w.to(dev)[:, None] - 1) - ox  # (B, T)
        gy = 2 * ys / max(Fq - 1, 1) - 1
        gx = 2 * xs / max(T - 1, 1) - 1
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, F, T, 2)
        out = F.grid_sample(x.unsqueeze(1).float(), grid.float(), mode="bicubic", padding_mode="zeros",
                            align_corners=True)
        return out.squeeze(1).to(x.dtype)


@AUGMENTS.register("rlf")
class RandomLinearFader(nn.Module):
    """BYOL-A v2 random linear fader: add a line from head to tail (each gain x U(-1, 1)) over
    time to the log-mel, i.e. a linear fade in level."""

    @dataclass
    class Config:
        gain: float = 1.0

    def __init__(self, cfg: Config, shape: tuple[int, int]):
        super().__init__()
        self.cfg = cfg

    def forward(self, x: Tensor, g: torch.Generator) -> Tensor:
        B, _, T = x.shape
        ends = self.cfg.gain * (2 * torch.rand(B, 2, generator=g, device=g.device) - 1)
        t = torch.linspace(0, 1, T, device=x.device, dtype=x.dtype)
        slope = ends[:, :1].to(x) + (ends[:, 1:] - ends[:, :1]).to(x) * t[None]  # (B, T)
        return x + slope[:, None, :]


class ViewChain(nn.Module):
    """The preset's `views` list, applied in order: (B, F, T) -> (B, F, T)."""

    def __init__(self, sections: list[dict], shape: tuple[int, int]):
        super().__init__()
        self.augs = nn.ModuleList(AUGMENTS.build(s, f"views[{i}]", shape=shape) for i, s in enumerate(sections))

    def forward(self, x: Tensor, g: torch.Generator) -> Tensor:
        for aug in self.augs:
            x = aug(x, g)
        return x


def normalize_batch(x: Tensor) -> Tensor:
    """BYOL-A v2 post-normalisation: standardise the batch of all views with its own mean/std."""
    return (x - x.mean()) / x.std().clamp_min(torch.finfo(x.dtype).eps)
