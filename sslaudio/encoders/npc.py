"""Convolution blocks with masked convolutions on log-mel frames: the NPC encoder.

Liu, Chung, Glass. "Non-Autoregressive Predictive Coding for Learning Speech Representations from
Local Dependencies", Interspeech 2021. Official code: github.com/Alexander-H-Liu/NPC (model/npc.py,
config/self_supervised/npc_example.yml) and its copy in s3prl (github.com/s3prl/s3prl:
s3prl/upstream/npc/npc.py `ConvBlock`, `MaskConvBlock`, `NPC`; s3prl/upstream/npc/expert.py, what
downstream tasks get; s3prl/pretrain/npc/config_model.yaml).

log-mel (B, F, T) -> L ConvBlocks, block i:
    Conv1d(kernel 3) - BN - act - Conv1d(kernel 1) - BN - dropout - (+ block input, i > 0) - act
and after each block a masked convolution (Conv1d of `kernel` taps whose centre m_i = mask + 2 (i + 1)
taps are zeroed, then tanh) whose outputs are summed over the blocks (the official "masked feature
aggregation"). Block i's output at t has seen input frames t - (i + 1) .. t + (i + 1), and its masked
convolution skips block outputs within (m_i - 1) / 2 of t, so the sum at t never sees the `mask`
input frames centred on t (the paper's M_in) and sees up to kernel // 2 + L frames either side
(receptive field kernel + 2 L). The VQ layer and the postnet that turn that sum into a guess of
frame t belong to the method (methods/npc.py).

Output: the tokens are the aggregated masked features (B, T, hidden), the representation s3prl's
NPC upstream returns as "default" (`NPC.forward`'s second output). A frame's token therefore does
not depend on the frames nearest to it. The official README notes that the unmasked output of the
last ConvBlock probed better for phones (PER 25.6 vs 27.2 %); `return_layers` gives every
ConvBlock's (unmasked) output followed by the tokens, so `--layer -2` selects it (s3prl's hidden
states also list each masked convolution's own output; those are left out here).

Padding: padded frames are zeroed before every convolution, so a convolution near an item's end
reads zeros as it would with the item alone (zero padding); in training the BatchNorm statistics
come from valid frames only (s3prl's include the padded ones). Valid outputs of a padded batch in
eval mode equal those of each item alone (tested). Without lengths every frame is valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslaudio.config import ConfigError
from sslaudio.encoders.base import (
    Encoder,
    EncoderOut,
    check_input,
    lengths_to_padding,
    stft_frame_times,
)
from sslaudio.registry import ENCODERS


def valid_batch_norm(bn: nn.Module, h: Tensor, valid: Tensor | None) -> Tensor:
    """BatchNorm of (B, C, T) whose training statistics come from the valid frames only
    (valid (B, T) bool); padded frames pass through unchanged. Evaluation or no padding: bn(h)."""
    if valid is None or not bn.training or isinstance(bn, nn.Identity) or bool(valid.all()):
        return bn(h)
    ht = h.transpose(1, 2)  # (B, T, C)
    rows = bn(ht[valid]).to(ht.dtype)  # (N, C): BatchNorm1d over N valid frames
    return ht.masked_scatter(valid.unsqueeze(-1), rows).transpose(1, 2)


class ConvBlock(nn.Module):
    """s3prl `ConvBlock`: conv3 - BN - act - conv1 - BN - dropout - (+ input) - act, (B, C, T) in and out."""

    def __init__(self, in_dim: int, dim: int, residual: bool, dropout: float, batch_norm: bool, act: nn.Module):
        super().__init__()
        self.residual = residual
        self.conv = nn.Conv1d(in_dim, dim, kernel_size=3, padding=1)
        self.linear = nn.Conv1d(dim, dim, kernel_size=1)
        self.bn1 = nn.BatchNorm1d(dim) if batch_norm else nn.Identity()
        self.bn2 = nn.BatchNorm1d(dim) if batch_norm else nn.Identity()
        self.act = act
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor | None) -> Tensor:
        h = self.act(valid_batch_norm(self.bn1, self.conv(x), valid))
        h = self.dropout(valid_batch_norm(self.bn2, self.linear(h), valid))
        h = self.act(h + x if self.residual else h)
        return h if valid is None else h * valid.unsqueeze(1).to(h.dtype)  # zeros for the next conv


class MaskedConv(nn.Module):
    """s3prl `MaskConvBlock`: Conv1d (same padding) with the centre `mask` taps zeroed, then tanh.
    (B, C, T) -> (B, T, C); the output at t ignores inputs t - mask // 2 .. t + mask // 2."""

    def __init__(self, dim: int, kernel: int, mask: int):
        super().__init__()
        self.mask = mask
        self.conv = nn.Conv1d(dim, dim, kernel_size=kernel, padding=kernel // 2)
        taps = torch.ones(kernel)
        head = (kernel - mask) // 2
        taps[head:head + mask] = 0.0
        self.register_buffer("taps", taps.view(1, 1, kernel), persistent=False)  # rebuilt from the config

    def forward(self, h: Tensor) -> Tensor:
        y = F.conv1d(h, self.conv.weight * self.taps, self.conv.bias, padding=self.conv.padding)
        return torch.tanh(y).transpose(1, 2)


@ENCODERS.register("npc")
class NPCEncoder(Encoder):
    """(B, F, T) log-mel -> (B, T, hidden) aggregated masked features; one output per input frame."""

    @dataclass
    class Config:
        blocks: int = 4  # n_blocks
        hidden: int = 512  # hidden_size
        kernel: int = 15  # kernel_size of the masked convolutions
        mask: int = 5  # mask_size: input frames around t hidden from the output at t (M_in)
        dropout: float = 0.1  # ConvBlock dropout
        residual: bool = True  # residual connection in every ConvBlock but the first
        batch_norm: bool = True
        activation: Literal["relu", "tanh"] = "relu"  # activate (ConvBlocks; masked convs use tanh)

        def __post_init__(self):
            if self.blocks < 1 or self.hidden < 1:
                raise ConfigError(f"encoder.blocks and encoder.hidden must be >= 1, found {self.blocks}, {self.hidden}")
            if self.kernel < 3 or self.kernel % 2 == 0:
                raise ConfigError(f"encoder.kernel must be an odd number >= 3, found {self.kernel}")
            if self.mask < 1 or self.mask % 2 == 0:
                raise ConfigError(f"encoder.mask must be an odd number >= 1, found {self.mask}")
            if self.mask + 2 * self.blocks >= self.kernel:
                raise ConfigError(f"encoder.kernel {self.kernel} must exceed the last block's masked span "
                                  f"encoder.mask + 2 * encoder.blocks = {self.mask + 2 * self.blocks}")
            if not 0.0 <= self.dropout < 1.0:
                raise ConfigError(f"encoder.dropout must be in [0, 1), found {self.dropout}")
            if self.activation not in ("relu", "tanh"):
                raise ConfigError(f"encoder.activation: {self.activation!r} is not one of ['relu', 'tanh']")

    def __init__(self, cfg: Config, frontend):
        super().__init__()
        n_in = int(frontend.out_channels)
        if n_in == 1 and int(frontend.hop) == 1:
            raise ConfigError("encoder.name: 'npc' reads spectrogram frames; use a spectrogram frontend "
                              "(frontend.name: logmel)")
        self.cfg = cfg
        self.in_dim = n_in
        act = nn.ReLU() if cfg.activation == "relu" else nn.Tanh()
        self.mask_sizes = [cfg.mask + 2 * (i + 1) for i in range(cfg.blocks)]  # grows by 2 per block
        self.blocks = nn.ModuleList([
            ConvBlock(n_in if i == 0 else cfg.hidden, cfg.hidden, residual=cfg.residual and i > 0,
                      dropout=cfg.dropout, batch_norm=cfg.batch_norm, act=act) for i in range(cfg.blocks)])
        self.masked_convs = nn.ModuleList([MaskedConv(cfg.hidden, cfg.kernel, m) for m in self.mask_sizes])
        self.dim = self.frame_dim = cfg.hidden
        self.downsample = int(frontend.hop)  # one output per input frame
        self.sample_rate = int(frontend.sample_rate)

    @property
    def receptive_field(self) -> int:
        """Input frames the output at t may depend on: kernel + 2 * blocks (s3prl `create_msg`)."""
        return self.cfg.kernel + 2 * self.cfg.blocks

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """One output per input frame."""
        return lengths

    def frame_times(self, n_frames: int) -> Tensor:
        """Frame t of a centred STFT (the logmel frontend) is centred on sample t * hop; the output
        at t reads input frames placed symmetrically around t."""
        return stft_frame_times(n_frames, self.downsample, 1, self.sample_rate)

    def forward(self, x: Tensor, lengths: Tensor | None = None, mask=None, return_layers: bool = False) -> EncoderOut:
        if mask is not None:
            raise ValueError("npc: token masks are not supported (the masked convolutions hide each frame's "
                             "neighbourhood instead)")
        check_input("npc", x, lengths, self.in_dim, 1, "one output frame")
        padding = valid = None
        if lengths is not None:
            lengths = lengths.to(x.device)
            padding = lengths_to_padding(lengths, x.shape[-1])  # (B, T)
            valid = ~padding
            x = x * valid.unsqueeze(1).to(x.dtype)  # the first conv reads zeros past each item's end
        h = x  # (B, F, T)
        feat = None
        layers: list[Tensor] = []
        for block, masked_conv in zip(self.blocks, self.masked_convs):
            h = block(h, valid)  # (B, H, T): unmasked features, padded frames zeroed
            m = masked_conv(h)  # (B, T, H): blind to the neighbourhood of each frame
            feat = m if feat is None else feat + m
            if return_layers:
                layers.append(h.transpose(1, 2))
        if return_layers:
            layers.append(feat)
        return EncoderOut(tokens=feat, padding=padding, layers=layers if return_layers else None,
                          grid=(x.shape[-1],), lengths=lengths, frame_padding=padding)
