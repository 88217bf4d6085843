"""View augmentations on batched log-mel spectrograms (B, F, T), on the training device, and the
view sampler that view-based methods (BYOL, SimSiam, Barlow Twins, VICReg, SimCLR, MoCo, and
later DINO / SwAV multi-crop) use to turn batch["audio"] into augmented views.

Each augmentation is a registered module `forward(x, generator) -> x` whose random draws all come
from the passed generator, one draw per sample (no Python loop over samples). A preset's `views`
section is a list of augmentations applied in order to every view (`ViewChain`).

BYOL-A (Niizumi et al., IJCNN 2021; v2: TASLP 2023, github.com/nttcslab/byol-a) augmentations:
  mixup     log-mixup-exp with a FIFO memory of past inputs
  rrc       random resize crop in a virtual canvas, bicubic resize back
  rlf       random linear fader (v2): a linear gain slope in the log domain
General ones:
  gain      a random level offset per clip
  noise     additive noise at a random SNR, mixed in the exp domain like mixup
  tf_mask   SpecAugment time and frequency masking (Park et al., Interspeech 2019)

The domain they work in: the log-mel frontend gives x = (ln(P + eps) - mean) / std, the natural log
of mel power P standardised by dataset-wide scalars. A power gain of g dB adds g ln(10) / 10 =
0.2303 g to ln P, i.e. 0.2303 g / std to x: with the AudioSet std of about 4.6, an offset of 0.1 is
about 2 dB. exp(x) is (P / e^mean)^(1 / std), a compressed power; mixup and noise add there.

The view sampler (`sslaudio.methods.base.ViewMethod` holds one and calls it)
---------------------------------------------------------------------------
`batch["audio"]` is (B, V, S) with V = preset.data.segments independent random crops of one file.
`ViewSampler(preset.views, crop shape, V, MultiCrop(global_crops=n))` gives n global views:
  V == 1: the one crop augmented n times (BYOL-A: the same segment, two augmentations);
  V == n: crop i augmented once for view i (different segments of the same recording are
          positives: COLA, ATST-Clip);
so which rule a preset uses is its `data.segments`. Global views share one augmentation chain (and
so one mixup memory, as BYOL-A's code) unless `MultiCrop.global_augment` gives one chain per view.
Multi-crop (DINO / SwAV): `MultiCrop(local_crops=k, local_frames=L)` adds k short views after the
global ones, each a random L-frame time window (`random_time_crop`) of crop j % V, augmented by
`local_augment` (default: the preset's chain, its own instance since the memory shape differs).
A method holds MultiCrop in its Config (a nested dataclass), so multi-crop is preset configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslaudio.config import ConfigError, build_component, check_range
from sslaudio.hostint import host_int, set_host_int
from sslaudio.registry import AUGMENTS


def _check_interval(key: str, pair: tuple[float, float], **low_bounds) -> None:
    """A [low, high] draw range: both finite, high >= low, low within `low_bounds` (check_range's
    keywords). A NaN end used to pass a plain low <= high test and train on NaN."""
    check_range(f"{key}[0]", pair[0], **low_bounds)
    check_range(f"{key}[1]", pair[1], low=pair[0])


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
        filled = host_int(self, "filled")
        idx = torch.randint(0, max(filled, 1), (B,), generator=g, device=g.device)
        if filled > 0:
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
        ptr = host_int(self, "ptr")
        pos = (ptr + torch.arange(x.shape[0], device=self.bank.device)) % M
        self.bank[pos] = x.to(self.bank.dtype)
        set_host_int(self, "ptr", (ptr + x.shape[0]) % M)
        set_host_int(self, "filled", min(M, host_int(self, "filled") + x.shape[0]))


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

        def __post_init__(self):
            # a canvas smaller than the input, a zero-size box or a reversed range trained silently
            for i, v in enumerate(self.virtual_crop):
                check_range(f"views.rrc.virtual_crop[{i}]", v, low=1)
            for key in ("freq_scale", "time_scale"):
                _check_interval(f"views.rrc.{key}", getattr(self, key), low=0, low_open=True)

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

        def __post_init__(self):
            check_range("views.rlf.gain", self.gain, low=0)  # NaN faded every input to NaN

    def __init__(self, cfg: Config, shape: tuple[int, int]):
        super().__init__()
        self.cfg = cfg

    def forward(self, x: Tensor, g: torch.Generator) -> Tensor:
        B, _, T = x.shape
        ends = self.cfg.gain * (2 * torch.rand(B, 2, generator=g, device=g.device) - 1)
        t = torch.linspace(0, 1, T, device=x.device, dtype=x.dtype)
        slope = ends[:, :1].to(x) + (ends[:, 1:] - ends[:, :1]).to(x) * t[None]  # (B, T)
        return x + slope[:, None, :]


@AUGMENTS.register("gain")
class Gain(nn.Module):
    """A random level change per clip: x + o, o ~ U(offset) in normalised log-mel units.

    A power gain of g dB is o = 0.2303 g / std, std being the frontend's normalisation statistic
    (module docstring); the default +-0.3 is about +-6 dB at the AudioSet std of 4.6."""

    @dataclass
    class Config:
        offset: tuple[float, float] = (-0.3, 0.3)

        def __post_init__(self):
            _check_interval("views.gain.offset", self.offset)

    def __init__(self, cfg: Config, shape: tuple[int, int]):
        super().__init__()
        self.cfg = cfg

    def forward(self, x: Tensor, g: torch.Generator) -> Tensor:
        o = _uniform(x.shape[0], *self.cfg.offset, g).to(x)
        return x + o.view(-1, 1, 1)


@AUGMENTS.register("noise")
class Noise(nn.Module):
    """Additive noise at a random SNR (dB, uniform in `snr_db`), mixed where mixup mixes:
    x' = log(exp(x) + a n), a = mean(exp(x)) / 10^(snr / 10), per clip.

    The noise n has the statistics of a Gaussian noise's power spectrum (one exponential draw of
    mean 1 per mel bin and frame) with the same expected level in every mel band: roughly pink
    (equal power per octave) above ~1 kHz, where mel bands are log-spaced, and flatter than white
    below. The SNR is measured in the exp(x) domain (compressed power, module docstring), the
    domain of BYOL-A's log-mixup-exp. Computed in float32 with a per-clip max shift, so it never
    overflows."""

    @dataclass
    class Config:
        snr_db: tuple[float, float] = (10.0, 40.0)

        def __post_init__(self):
            _check_interval("views.noise.snr_db", self.snr_db)

    def __init__(self, cfg: Config, shape: tuple[int, int]):
        super().__init__()
        self.cfg = cfg

    def forward(self, x: Tensor, g: torch.Generator) -> Tensor:
        B = x.shape[0]
        snr = _uniform(B, *self.cfg.snr_db, g).to(x.device).view(B, 1, 1)
        u = torch.rand(x.shape, generator=g, device=g.device).to(x.device)
        noise = -torch.log1p(-u)  # Exp(1): the periodogram of Gaussian noise, in [0, inf)
        xf = x.float()
        top = xf.amax(dim=(1, 2), keepdim=True)
        sig = (xf - top).exp()  # (B, F, T) signal in the exp domain, shifted by the clip's max
        a = sig.mean(dim=(1, 2), keepdim=True) / 10 ** (snr / 10)
        return (top + torch.log(sig + a * noise)).to(x.dtype)


def _bands(B: int, size: int, n: int, width: int, g: torch.Generator, device) -> Tensor:
    """(B, size) bool: the union of n bands per row, widths uniform in {0..width}, each placed
    uniformly inside the row (SpecAugment: f ~ U{0..F}, f0 ~ U{0..size - f})."""
    if n == 0 or width == 0:
        return torch.zeros(B, size, dtype=torch.bool, device=device)
    w = (torch.rand(B, n, generator=g, device=g.device) * (width + 1)).floor().clamp(max=size)
    start = (torch.rand(B, n, generator=g, device=g.device) * (size - w + 1)).floor()
    w, start = w.to(device), start.to(device)
    idx = torch.arange(size, device=device)
    return ((idx >= start[..., None]) & (idx < (start + w)[..., None])).any(dim=1)


@AUGMENTS.register("tf_mask")
class TimeFreqMask(nn.Module):
    """SpecAugment time and frequency masking (Park et al., Interspeech 2019, sec. 2): per clip,
    `freq_masks` bands of f ~ U{0..freq_width} mel bins and `time_masks` bands of t ~
    U{0..min(time_width, time_ratio * T)} frames are set to `fill`. The paper sets masks to the
    mean, which is 0 for its normalised input; our input is normalised with dataset statistics, so
    "zero" is the dataset mean and "mean" uses each clip's own mean. The paper's LibriSpeech
    double policy is 2 masks of F = 27 (of 80 bins) and 2 of T = 100 frames."""

    @dataclass
    class Config:
        freq_masks: int = 2
        freq_width: int = 8
        time_masks: int = 2
        time_width: int = 16
        time_ratio: float = 1.0  # SpecAugment's p: a time mask covers at most p * T frames
        fill: Literal["zero", "mean"] = "zero"

        def __post_init__(self):
            if min(self.freq_masks, self.freq_width, self.time_masks, self.time_width) < 0:
                raise ConfigError("views.tf_mask: mask counts and widths must be >= 0")
            if not 0 <= self.time_ratio <= 1:
                raise ConfigError("views.tf_mask: time_ratio must be in [0, 1]")

    def __init__(self, cfg: Config, shape: tuple[int, int]):
        super().__init__()
        self.cfg = cfg

    def forward(self, x: Tensor, g: torch.Generator) -> Tensor:
        B, Fq, T = x.shape
        c = self.cfg
        f_mask = _bands(B, Fq, c.freq_masks, c.freq_width, g, x.device)  # (B, F)
        t_mask = _bands(B, T, c.time_masks, min(c.time_width, int(c.time_ratio * T)), g, x.device)  # (B, T)
        mask = f_mask[:, :, None] | t_mask[:, None, :]
        fill = x.mean(dim=(1, 2), keepdim=True) if c.fill == "mean" else torch.zeros((), dtype=x.dtype,
                                                                                     device=x.device)
        return torch.where(mask, fill, x)


class ViewChain(nn.Module):
    """The preset's `views` list, applied in order: (B, F, T) -> (B, F, T)."""

    def __init__(self, sections: list[dict], shape: tuple[int, int]):
        super().__init__()
        self.augs = nn.ModuleList(build_component(AUGMENTS, s, f"views[{i}]", shape=shape)
                                  for i, s in enumerate(sections))

    def forward(self, x: Tensor, g: torch.Generator) -> Tensor:
        for aug in self.augs:
            x = aug(x, g)
        return x


def random_time_crop(x: Tensor, frames: int, g: torch.Generator) -> Tensor:
    """(B, F, T) -> (B, F, frames): a window at a uniformly random start per clip (multi-crop's
    local views)."""
    B, Fq, T = x.shape
    if not 1 <= frames <= T:
        raise ValueError(f"random_time_crop: frames={frames} must be in [1, {T}]")
    start = (torch.rand(B, generator=g, device=g.device) * (T - frames + 1)).floor().long().to(x.device)
    idx = start[:, None] + torch.arange(frames, device=x.device)  # (B, frames)
    return x.gather(2, idx[:, None, :].expand(B, Fq, frames))


@dataclass
class MultiCrop:
    """How many views a method takes and which augmentation chain each gets (a nested dataclass
    in the method's Config; see the module docstring).

    global_crops: full-length views; data.segments must be 1 or this number.
    local_crops / local_frames: DINO / SwAV short views, random windows of local_frames frames.
    global_augment: one augmentation list per global view (BYOL's asymmetric views); default: the
      preset's `views` chain for all of them. local_augment: the chain of the local views; default:
      the preset's `views` chain (a separate instance).
    """

    global_crops: int = 2
    local_crops: int = 0
    local_frames: int = 0
    global_augment: list | None = None
    local_augment: list | None = None

    def __post_init__(self):
        if self.global_crops < 1 or self.local_crops < 0:
            raise ConfigError("crops: global_crops must be >= 1 and local_crops >= 0")
        if self.local_crops and self.local_frames < 1:
            raise ConfigError("crops.local_frames must be >= 1 when local_crops > 0")
        if self.global_augment is not None and len(self.global_augment) != self.global_crops:
            raise ConfigError(f"crops.global_augment: expected {self.global_crops} augmentation lists "
                              f"(one per global view), found {len(self.global_augment)}")


class ViewSampler(nn.Module):
    """(B, V, F, T) crops of each file -> [global views (B, F, T)..., local views (B, F, L)...].

    V must be 1 (every global view augments the one crop) or crops.global_crops (view i augments
    crop i). Chains are submodules, so their state (mixup memories) is checkpointed with the method.
    """

    def __init__(self, augment: list[dict], shape: tuple[int, int], segments: int,
                 crops: MultiCrop | None = None):
        super().__init__()
        crops = crops or MultiCrop()
        self.crops = crops
        n = crops.global_crops
        if segments not in (1, n):
            raise ConfigError(f"data.segments: {n} global views need 1 crop per file (augmented {n} "
                              f"times) or {n} crops (one per view), found {segments}")
        chains = crops.global_augment if crops.global_augment is not None else [augment]
        if segments == 1 and n > 1 and not any(chains):
            raise ConfigError("views: with data.segments 1 every view is the same crop, so the views need "
                              "an augmentation chain (or set data.segments to the number of views)")
        self.global_chains = nn.ModuleList(ViewChain(c or [], shape) for c in chains)
        self.local_chain = None
        if crops.local_crops:
            if crops.local_frames > shape[1]:
                raise ConfigError(f"crops.local_frames {crops.local_frames} exceeds the {shape[1]} frames "
                                  f"of a crop")
            local = crops.local_augment if crops.local_augment is not None else augment
            self.local_chain = ViewChain(local, (shape[0], crops.local_frames))

    @torch.no_grad()
    def forward(self, x: Tensor, g: torch.Generator) -> list[Tensor]:
        if x.ndim != 4:
            raise ValueError(f"ViewSampler expects (B, V, F, T) crops, found shape {tuple(x.shape)}")
        V, n = x.shape[1], self.crops.global_crops
        if V not in (1, n):
            raise ValueError(f"ViewSampler: {n} global views need 1 or {n} crops per file, found {V}")
        views = []
        for i in range(n):
            chain = self.global_chains[i if len(self.global_chains) > 1 else 0]
            views.append(chain(x[:, i if V > 1 else 0], g))
        for j in range(self.crops.local_crops):
            views.append(self.local_chain(random_time_crop(x[:, j % V], self.crops.local_frames, g), g))
        return views


def normalize_batch(x: Tensor) -> Tensor:
    """BYOL-A v2 post-normalisation: standardise the batch of all views with its own mean/std."""
    return (x - x.mean()) / x.std().clamp_min(torch.finfo(x.dtype).eps)
