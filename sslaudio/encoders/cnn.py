"""BYOL-A's convolutional encoders (github.com/nttcslab/byol-a, models.py and v2/byol_a2/models.py).

AudioNTT2020 (Koizumi et al., DCASE2020 task 6 system; BYOL-A, Niizumi et al., IJCNN 2021):
3 x [conv3x3 64 - BN - ReLU - maxpool 2x2], the (mel, channel) axes flattened per time step, then
Linear(64 * F/8, d) - ReLU - Dropout 0.3 - Linear(d, d) - ReLU. Clip embedding: temporal max + mean.

AudioNTT2022 (BYOL-A v2, TASLP 2023): 2 conv blocks, an MLP (hidden 2048) to d - conv_d, and the
conv features concatenated with the MLP output, so low-level and high-level features both reach d.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from sslaudio.config import ConfigError, check_range
from sslaudio.encoders.base import (
    Encoder,
    EncoderOut,
    check_input,
    lengths_to_padding,
    stft_frame_times,
)
from sslaudio.registry import ENCODERS


@ENCODERS.register("audiontt")
class AudioNTT(Encoder):
    @dataclass
    class Config:
        version: Literal[2020, 2022] = 2020
        d: int = 2048  # output width (frame and clip)
        base_d: int = 64  # conv channels
        mlp_hidden: int = 2048  # 2022 only: hidden width of the MLP
        dropout: float = 0.3

        def __post_init__(self):
            if self.d < 1 or self.base_d < 1:
                raise ConfigError("encoder.d and encoder.base_d must be positive")
            # both reached torch as a traceback when the model was built
            check_range("encoder.mlp_hidden", self.mlp_hidden, low=1)
            check_range("encoder.dropout", self.dropout, low=0, high=1, high_open=True)

    def __init__(self, cfg: Config, frontend):
        super().__init__()
        self.cfg = cfg
        n_conv = 3 if cfg.version == 2020 else 2
        n_mels = frontend.out_channels
        if n_mels % (2**n_conv):
            raise ConfigError(f"encoder: audiontt needs n_mels divisible by {2**n_conv}, found {n_mels}")
        layers: list[nn.Module] = []
        for k in range(n_conv):
            layers += [nn.Conv2d(1 if k == 0 else cfg.base_d, cfg.base_d, 3, stride=1, padding=1),
                       nn.BatchNorm2d(cfg.base_d), nn.ReLU(), nn.MaxPool2d(2, stride=2)]
        self.features = nn.Sequential(*layers)
        self.pool_factor = 2**n_conv
        self.n_mels = n_mels
        self.conv_d = cfg.base_d * (n_mels // self.pool_factor)
        if cfg.version == 2020:
            self.fc = nn.Sequential(nn.Linear(self.conv_d, cfg.d), nn.ReLU(), nn.Dropout(cfg.dropout),
                                    nn.Linear(cfg.d, cfg.d), nn.ReLU())
        else:
            if cfg.d <= self.conv_d:
                raise ConfigError(f"encoder.d must exceed the conv width {self.conv_d} for version 2022")
            self.fc = nn.Sequential(nn.Linear(self.conv_d, cfg.mlp_hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                                    nn.Linear(cfg.mlp_hidden, cfg.d - self.conv_d), nn.ReLU())
        self.dim = self.frame_dim = cfg.d
        self.hop = int(frontend.hop)
        self.downsample = self.hop * self.pool_factor
        self.sample_rate = int(frontend.sample_rate)
        self.clip_pool = ("mean", "max")  # BYOL-A: temporal mean + max

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """(B,) valid spectrogram frames -> (B,) valid output frames (each pools `pool_factor`)."""
        return torch.clamp(lengths // self.pool_factor, min=1)

    def frame_times(self, n_frames: int) -> Tensor:
        """Output frame j max-pools STFT frames 8j .. 8j + 7 (symmetric 3x3 convs around them)."""
        return stft_frame_times(n_frames, self.hop, self.pool_factor, self.sample_rate)

    def forward(self, x: Tensor, lengths: Tensor | None = None, mask=None, return_layers: bool = False) -> EncoderOut:
        if mask is not None:
            raise ValueError("audiontt does not support token masks")
        # items=False: a padded item shorter than one output frame still gets that frame
        # (output_lengths clamps to 1), as it always has
        check_input("audiontt", x, lengths, self.n_mels, self.pool_factor, "one output frame", items=False)
        # inference in channels-last: the CPU's max-pool and conv kernels are much faster on it (the
        # conv stack's forward 1.7x (2020) / 3.2x (2022) on 1 thread; the same values up to float
        # rounding). Training keeps the default layout: its whole step was no faster that way
        h = x.unsqueeze(1)
        if not self.training:
            h = h.contiguous(memory_format=torch.channels_last)
        h = self.features(h)  # (B, C, F', T')
        h = h.permute(0, 3, 2, 1).flatten(2)  # (B, T', F'*C), mel-major as the official reshape
        y = self.fc(h)
        if self.cfg.version == 2022:
            y = torch.cat([h, y], dim=-1)  # (B, T', d)
        padding = None
        if lengths is not None:
            padding = lengths_to_padding(self.output_lengths(lengths), y.shape[1])
        return EncoderOut(tokens=y, padding=padding, layers=[y] if return_layers else None)
