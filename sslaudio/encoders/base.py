"""The encoder interface every architecture implements.

`forward(x, lengths, mask=None, return_layers=False) -> EncoderOut`:
  x: frontend output, (B, F, T) spectrogram or (B, S) waveform; lengths: (B,) valid frames/samples.
  mask: a `sslaudio.masking.Mask` (keep mode drops masked tokens, replace mode swaps in a learned
  mask token), or None.
`to_frames(out) -> (frames (B, T, D), lengths (B,))`: time-major features for extraction.
`pool(out) -> (B, D)`: the clip embedding.
`downsample`: input waveform samples per output frame (the frontend hop times the encoder's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class EncoderOut:
    tokens: Tensor  # (B, N, D) output tokens (only the visible ones in keep-mask mode)
    padding: Tensor | None = None  # (B, N) True where a token is padding
    layers: list[Tensor] | None = None  # every block's output (B, N, D), when asked for
    extra: dict | None = None  # encoder-specific facts (token grid, kept indices, ...)


def lengths_to_padding(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, max_len) bool, True at padded positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


def masked_mean(x: Tensor, padding: Tensor | None) -> Tensor:
    """Mean over dim 1 of (B, T, D), ignoring padded steps."""
    if padding is None:
        return x.mean(dim=1)
    keep = (~padding).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def pool_frames(x: Tensor, padding: Tensor | None, stats: tuple[str, ...]) -> Tensor:
    """(B, T, D) -> (B, D): sum of the requested statistics ('mean', 'max') over valid steps."""
    out = 0
    for s in stats:
        if s == "mean":
            out = out + masked_mean(x, padding)
        elif s == "max":
            out = out + (x if padding is None else x.masked_fill(padding.unsqueeze(-1), float("-inf"))).amax(1)
        else:
            raise ValueError(f"unknown pooling statistic '{s}'")
    return out


class Encoder(nn.Module):
    dim: int  # width of the tokens / frames
    downsample: int  # waveform samples per output frame
    sample_rate: int

    def to_frames(self, out: EncoderOut) -> tuple[Tensor, Tensor]:
        frames = out.tokens
        if out.padding is None:
            lengths = torch.full((frames.shape[0],), frames.shape[1], device=frames.device, dtype=torch.long)
        else:
            lengths = (~out.padding).sum(1)
        return frames, lengths

    clip_pool: tuple[str, ...] = ("mean",)  # statistics over time summed into the clip embedding

    def pool(self, out: EncoderOut) -> Tensor:
        """Clip embedding (B, D): the sum of `clip_pool` statistics of the valid frames."""
        frames, lengths = self.to_frames(out)
        return pool_frames(frames, lengths_to_padding(lengths, frames.shape[1]), self.clip_pool)

    def frame_times(self, n_frames: int) -> Tensor:
        """Centre time in seconds of each output frame."""
        return (torch.arange(n_frames, dtype=torch.float64) + 0.5) * self.downsample / self.sample_rate
