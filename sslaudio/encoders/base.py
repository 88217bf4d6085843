"""The encoder contract every architecture implements.

`forward(x, lengths=None, mask=None, return_layers=False) -> EncoderOut`: x is the frontend output
((B, F, T) spectrogram or (B, S) waveform), lengths (B,) its valid frames / samples, mask a
`sslaudio.masking.Mask` (keep mode drops hidden tokens, replace mode swaps in a learned token).

Every encoder declares:
- `dim` (token width), `frame_dim` (width of one time frame: `dim`, or Fg * dim for patch grids),
  `downsample` (waveform samples per output frame), `sample_rate`, `frame_rate` (frames per second);
- `output_lengths(lengths)`: valid input frames / samples -> valid output frames;
- `frame_times(n_frames)`: the centre, in seconds, of each output frame's receptive field;
- `token_grid(x_shape)` and `token_padding(lengths, x_shape)`: the token grid a masker draws on
  ((T,) for sequences, (Fg, Tg) for patches) and its padding;
- `to_frames(out)`: time-major frames (B, T, frame_dim) and their lengths; `pool(out)`: the clip
  embedding, the `clip_pool` statistics of the valid frames (`ClipPool` also accumulates them over
  frames that arrive in chunks, so long files pool exactly as short ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class EncoderOut:
    tokens: Tensor  # (B, N, D) output tokens (only the visible ones under a keep mask)
    padding: Tensor | None = None  # (B, N) True where a token is padding
    # with return_layers, every layer's output (B, N, D); a transformer's are its hidden states as SUPERB
    # and transformers count them: the blocks' input (the embedded tokens) first, then each block's output
    layers: list[Tensor] | None = None
    ffn: list[Tensor] | None = None  # every block's FFN output before the residual add, with return_layers
    cls: Tensor | None = None  # (B, D) final CLS token, for encoders that have one (never in tokens)
    grid: tuple[int, ...] | None = None  # token grid of one input: (T,) or (Fg, Tg)
    lengths: Tensor | None = None  # (B,) valid frames of the whole sequence (before keep / clone)
    frame_padding: Tensor | None = None  # (B, N) padding of the whole sequence, before keep / clone
    keep: bool = False  # tokens were gathered by a keep mask
    clone: int = 1  # masked copies per input (data2vec 2.0 clone_batch): rows b * K + k
    local: Tensor | None = None  # (B, T, C) local features the context network reads (CPC z,
    #                              wav2vec 2.0's projected conv features, before dropout and masks)
    features: Tensor | None = None  # (B, T, C) normalised conv features (wav2vec 2.0 quantizer input)
    features_pen: Tensor | None = None  # scalar mean square of the raw conv features (feature penalty)


def lengths_to_padding(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, max_len) bool, True at padded positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


def masked_mean(x: Tensor, padding: Tensor | None) -> Tensor:
    """Mean over dim 1 of (B, T, D), ignoring padded steps."""
    if padding is None:
        return x.mean(dim=1)
    keep = (~padding).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)


POOLS = {"mean": ("mean",), "max": ("max",), "mean+max": ("mean", "max")}  # --pool names: statistics summed


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


class ClipPool:
    """`pool_frames` over (T, D) frames that arrive in chunks: running sum, count and max."""

    def __init__(self, stats: tuple[str, ...]):
        self.stats, self.sum, self.n, self.max = stats, None, 0, None

    def add(self, frames: Tensor) -> None:
        s, m = frames.sum(0), frames.amax(0)
        self.sum = s if self.sum is None else self.sum + s
        self.max = m if self.max is None else torch.maximum(self.max, m)
        self.n += frames.shape[0]

    def value(self) -> Tensor:
        out = 0
        for s in self.stats:
            out = out + (self.sum / max(self.n, 1) if s == "mean" else self.max)
        return out


def check_input(name: str, x: Tensor, lengths: Tensor | None, freq: int | None, min_len: int, unit: str,
                items: bool = True) -> None:
    """The input check every encoder's forward starts with, one line per fault (a ValueError
    naming the encoder): x is a (B, freq, T) spectrogram, or a (B, S) waveform where freq is None;
    lengths, when given, is (B,); x and every item in lengths span at least `min_len` frames or
    samples, `unit` saying what that many make (e.g. "one patch column"); with items=False only x
    is held to `min_len` (an encoder that gives a shorter padded item one frame). Reads lengths on
    the host only when they are given and checked, as the encoders' padding masks do anyway."""
    if freq is None:
        if x.dim() != 2:
            raise ValueError(f"{name}: expected a waveform (B, S), found {tuple(x.shape)}")
        what = "sample"
    else:
        if x.dim() != 3 or x.shape[1] != freq:
            raise ValueError(f"{name}: expected a spectrogram (B, {freq}, T), found {tuple(x.shape)}")
        what = "frame"
    if lengths is not None and lengths.shape != (x.shape[0],):
        raise ValueError(f"{name}: lengths must be ({x.shape[0]},), found {tuple(lengths.shape)}")
    held = lengths if items else None  # the lengths held to min_len
    if x.shape[-1] < min_len or (held is not None and bool((held < min_len).any())):
        def count(n: int) -> str:
            return f"{n} {what}" + ("" if n == 1 else "s")
        found = f"lengths {held.tolist()} with {count(x.shape[-1])} in x" if held is not None \
            else count(x.shape[-1])
        raise ValueError(f"{name}: every input needs at least {count(min_len)} ({unit}), found {found}")


def clone_for_mask(x: Tensor, padding: Tensor, mask, name: str, what: str) -> tuple[Tensor, Tensor, int]:
    """Tokens x (B, N, D) and padding (B, N) repeated for a mask of K masks per input (mask.masked
    (B*K, N), each input's K rows together): (x, padding, K). `name` (the encoder) and `what` (its
    N tokens) word the error."""
    mb, mn = mask.masked.shape
    B, N = padding.shape
    if mn != N or mb % B:
        raise ValueError(f"{name}: mask shape {tuple(mask.masked.shape)} does not fit {what} (expected ({B}*K, {N}))")
    clone = mb // B
    if clone > 1:
        x, padding = x.repeat_interleave(clone, 0), padding.repeat_interleave(clone, 0)
    return x, padding, clone


def stft_frame_times(n_frames: int, hop: int, stack: int, sample_rate: int) -> Tensor:
    """Centres of encoder frames that each cover `stack` consecutive frames of a centred STFT
    (frame i centred on sample i * hop): (stack * j + (stack - 1) / 2) * hop / sample_rate."""
    idx = torch.arange(n_frames, dtype=torch.float64) * stack + (stack - 1) / 2
    return idx * hop / sample_rate


class Encoder(nn.Module):
    dim: int  # token width
    frame_dim: int  # width of one time frame after `to_frames`
    downsample: int  # waveform samples per output frame
    sample_rate: int
    clip_pool: tuple[str, ...] = ("mean",)  # statistics over time summed into the clip embedding

    @property
    def frame_rate(self) -> float:
        """Output frames per second."""
        return self.sample_rate / self.downsample

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """(B,) valid input frames (or samples) -> (B,) valid output frames."""
        raise NotImplementedError

    def frame_times(self, n_frames: int) -> Tensor:
        """(n_frames,) float64: centre in seconds of each output frame's receptive field."""
        raise NotImplementedError

    def check_crop(self, samples: int, method: str) -> None:
        """Raise ConfigError if a training crop of `samples` cannot be encoded whole (the ViT's
        position table or chunk is shorter); any crop by default. Called once by every method."""

    def embedding_blocks(self, on: bool) -> None:
        """Embed with the output the encoder's evaluation uses (on; EncoderBundle turns it on) or
        with what its methods train (off). The same for most encoders; the ViT's `eval_blocks`
        concatenates several blocks."""

    def token_grid(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Input shape -> the token grid of one input, (T,) for a sequence of frames."""
        return (int(self.output_lengths(torch.tensor([int(x_shape[-1])]))[0]),)

    def token_padding(self, lengths: Tensor, x_shape: tuple[int, ...]) -> Tensor:
        """(B,) valid input frames (or samples) -> (B, N) bool, True at padded tokens."""
        return lengths_to_padding(self.output_lengths(lengths), self.token_grid(x_shape)[0])

    def to_frames(self, out: EncoderOut) -> tuple[Tensor, Tensor]:
        """-> time-major frames (B, T, frame_dim) and valid frames (B,). Needs every token."""
        if out.keep:
            raise ValueError(f"{type(self).__name__}.to_frames needs every token; encode without a keep mask")
        frames = out.tokens
        if out.padding is None:
            lengths = torch.full((frames.shape[0],), frames.shape[1], device=frames.device, dtype=torch.long)
        else:
            lengths = (~out.padding).sum(1)
        return frames, lengths

    def pool(self, out: EncoderOut) -> Tensor:
        """Clip embedding (B, frame_dim): the sum of `clip_pool` statistics of the valid frames."""
        frames, lengths = self.to_frames(out)
        return pool_frames(frames, lengths_to_padding(lengths, frames.shape[1]), self.clip_pool)
