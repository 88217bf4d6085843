"""CPC audio encoder: strided convolutions on the waveform, then a GRU context network.

van den Oord, Li, Vinyals. "Representation Learning with Contrastive Predictive Coding", arXiv
1807.03748, 2018; the audio re-implementation github.com/facebookresearch/CPC_audio (cpc/model.py
`CPCEncoder`, `ChannelNorm`, `CPCAR`; cpc/cpc_default_config.py).

waveform (B, S) -> 5 x [Conv1d (kernels 10, 8, 4, 4, 4; strides 5, 4, 2, 2, 2; paddings 3, 2, 1,
1, 1) -> ChannelNorm -> ReLU] -> z (B, T, C), one frame per 160 samples (10 ms at 16 kHz;
20480 samples give exactly 128 frames) -> GRU (1 layer of width G) -> c (B, T, G).
ChannelNorm (CPC_audio's default `normMode: layerNorm`) standardises each frame over its channels
(unbiased variance, eps 1e-5) with a per-channel affine; it never mixes time steps.
The tokens are the context vectors c_t, which CPC_audio's feature extraction and linear probes
use; `return_layers` gives [z, c] and `EncoderOut.local` the conv features z the CPC loss scores.

CPC_audio's argparse defaults are an LSTM context (`arMode`) with a transformer prediction head
(`rnnMode`), the later "CPC modified" variant; we build the paper's GRU context (CPC_audio
`--arMode GRU`, its `CPCAR` with `nn.GRU`), with CPC_audio's 256-wide encoder (the paper: 512).

Padding: the convolutions zero-pad each item on both sides; in a batch, a shorter item's tail
would see the next layer's features at padded steps instead. We zero every layer's output beyond
the item's valid length (and the waveform beyond its length), so each valid frame equals the
item's frame alone; the GRU is causal, so later padding cannot reach valid context vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslaudio.config import ConfigError
from sslaudio.encoders.base import Encoder, EncoderOut, check_input, lengths_to_padding
from sslaudio.registry import ENCODERS

# CPC_audio CPCEncoder: (kernel, stride, padding) per layer; 160x downsampling
CPC_CONV_LAYERS: list[tuple[int, int, int]] = [(10, 5, 3), (8, 4, 2), (4, 2, 1), (4, 2, 1), (4, 2, 1)]


class ChannelNorm(nn.Module):
    """CPC_audio ChannelNorm: per time step, (x - mean_C) / sqrt(var_C + eps) with the unbiased
    variance over channels, then weight * x + bias per channel. x (B, C, T); computed in float32."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        mean = xf.mean(dim=1, keepdim=True)
        var = xf.var(dim=1, keepdim=True)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight + self.bias).to(x.dtype)


def conv_lengths(lengths: Tensor, layers: list[tuple[int, int, int]]) -> Tensor:
    """Valid frames after each padded strided conv: L -> floor((L + 2p - k) / s) + 1 (clamped at 0)."""
    for k, s, p in layers:
        lengths = (torch.div(lengths + 2 * p - k, s, rounding_mode="floor") + 1).clamp_min(0)
    return lengths


@ENCODERS.register("cpc")
class CPCEncoder(Encoder):
    @dataclass
    class Config:
        hidden: int = 256  # CPC_audio hiddenEncoder (conv channels, the width of z)
        context: int = 256  # CPC_audio hiddenGar (GRU width, the width of c)
        context_layers: int = 1  # CPC_audio nLevelsGRU
        conv_layers: list[tuple[int, int, int]] = field(default_factory=lambda: list(CPC_CONV_LAYERS))

        def __post_init__(self):
            if self.hidden < 2 or self.context < 1 or self.context_layers < 1:
                raise ConfigError("encoder: cpc needs hidden >= 2 (ChannelNorm's unbiased variance), "
                                  "context >= 1 and context_layers >= 1")
            if not self.conv_layers or any(len(c) != 3 or c[0] < 1 or c[1] < 1 or c[2] < 0
                                           for c in self.conv_layers):
                raise ConfigError("encoder.conv_layers must be a non-empty list of [kernel >= 1, "
                                  "stride >= 1, padding >= 0] triples")

    def __init__(self, cfg: Config, frontend):
        super().__init__()
        if int(frontend.out_channels) != 1 or int(frontend.hop) != 1:
            raise ConfigError("encoder.name: 'cpc' reads the raw waveform; use the waveform frontend "
                              "(frontend.name: waveform)")
        self.cfg = cfg
        self.layers_spec = [tuple(c) for c in cfg.conv_layers]
        self.convs = nn.ModuleList([nn.Conv1d(1 if i == 0 else cfg.hidden, cfg.hidden, k, stride=s, padding=p)
                                    for i, (k, s, p) in enumerate(self.layers_spec)])
        self.norms = nn.ModuleList([ChannelNorm(cfg.hidden) for _ in self.layers_spec])
        self.gru = nn.GRU(cfg.hidden, cfg.context, num_layers=cfg.context_layers, batch_first=True)
        self.dim = self.frame_dim = cfg.context
        self.z_dim = cfg.hidden
        stride, field_, left = 1, 1, 0
        for k, s, p in self.layers_spec:
            field_ += (k - 1) * stride
            left += p * stride
            stride *= s
        self.downsample = stride  # 160 samples per frame for the default layers
        self.receptive_field = field_  # 465 samples for the default layers
        self.left_pad = left  # samples of zero padding before the first frame's field
        need = 1  # fewest input samples that give one output frame
        for k, s, p in reversed(self.layers_spec):
            need = max((need - 1) * s + k - 2 * p, 1)
        self.min_samples = need  # 159 for the default layers
        self.sample_rate = int(frontend.sample_rate)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """(B,) valid samples -> (B,) valid frames."""
        return conv_lengths(lengths, self.layers_spec)

    def frame_times(self, n_frames: int) -> Tensor:
        """Centre in seconds of each frame's receptive field."""
        t = torch.arange(n_frames, dtype=torch.float64) * self.downsample - self.left_pad + (self.receptive_field - 1) / 2
        return t.clamp_min(0) / self.sample_rate

    def forward(self, x: Tensor, lengths: Tensor | None = None, mask=None, return_layers: bool = False) -> EncoderOut:
        if mask is not None:
            raise ValueError("cpc: token masks are not supported")
        check_input("cpc", x, lengths, None, self.min_samples, "one output frame")
        h = x.unsqueeze(1)  # (B, 1, S)
        frame_lengths = None
        if lengths is not None:
            frame_lengths = lengths.to(x.device)
            h = h.masked_fill(lengths_to_padding(frame_lengths, h.shape[-1])[:, None], 0.0)
        for conv, norm, spec in zip(self.convs, self.norms, self.layers_spec):
            h = F.relu(norm(conv(h)))  # (B, C, T_i)
            if frame_lengths is not None:  # zero the steps past each item's end, as its own padding
                frame_lengths = conv_lengths(frame_lengths, [spec])
                h = h.masked_fill(lengths_to_padding(frame_lengths, h.shape[-1])[:, None], 0.0)
        z = h.transpose(1, 2)  # (B, T, C)
        c, _ = self.gru(z)  # (B, T, G), causal
        padding = None if frame_lengths is None else lengths_to_padding(frame_lengths, c.shape[1])
        return EncoderOut(tokens=c, padding=padding, layers=[z, c] if return_layers else None,
                          local=z, lengths=frame_lengths, grid=(c.shape[1],))
