"""Masked predictive coding on log-mel frames: Mockingjay and TERA.

Liu, Yang, Chi, Hsu, Lee. "Mockingjay: Unsupervised Speech Representation Learning with Deep
Bidirectional Transformer Encoders", ICASSP 2020; Liu, Li, Lee. "TERA: Self-Supervised Learning of
Transformer Encoder Representation for Speech", IEEE/ACM TASLP 2021. Official code: s3prl
(github.com/s3prl/s3prl): s3prl/pretrain/mockingjay/task.py (`generate_masked_acoustic_model_data`,
the alteration), s3prl/pretrain/mockingjay/pretrain_expert.py (`TransformerForMaskedAcousticModel`,
the loss), s3prl/upstream/mockingjay/model.py (`TransformerModel`,
`TransformerSpecPredictionHead`), s3prl/pretrain/tera/config_model.yaml and
s3prl/pretrain/{mockingjay,tera}/config_runner.yaml.

A log-mel crop (stacked into tokens of `encoder.downsample` frames, the unit of everything below)
is altered, encoded by the frame transformer (encoders/frame_transformer.py), and a prediction
head (Linear D -> D, GELU, LayerNorm, Linear D -> F * downsample) reconstructs the original
frames; the loss is the L1 distance on the altered positions only (`losses.masked_reconstruction_loss`).
The alteration follows s3prl's `generate_masked_acoustic_model_data`, per utterance, batched here:

- Time (Mockingjay and TERA): round(len * mask_proportion / mask_consecutive) span starts (Python's
  round, half to even) drawn without replacement from [0, len - mask_consecutive - 1]; each span
  covers mask_consecutive frames and spans may overlap (`mask_allow_overlap: True`). One dice per
  utterance decides for all its spans: < 0.8 the frames become zeros; in [0.8, 0.9) each span is
  overwritten by another span of the same utterance (a second set of starts drawn the same way,
  paired in draw order; values taken before any alteration); otherwise the frames stay as they are.
  Every selected frame enters the loss whatever the dice said.
- Frequency (TERA, `mask_frequency` > 0): a band of U{0..int(F * mask_frequency)} consecutive mel
  bins starting at U{0..F - width - 1} (s3prl's `torch.randperm(F - width)[:1]`) is zeroed in every
  frame; its bins enter the loss at every valid frame.
- Magnitude (TERA, `noise_proportion` > 0): with that probability, once per batch as s3prl's
  collate-time dice, Gaussian noise of std `noise_std` is added to all frames; it adds no loss term.

The loss mask is the union (time-selected frames, band bins), as s3prl's `mask_label`.

Where we differ from s3prl, and why:
- Span starts are drawn here rather than by `masking.BlockMasker`: the 10 % random-frame branch
  pairs every selected span with its own source span, which needs each span's start (a Mask only
  carries the union), and the block masker's band start ranges over [0, F - width], one more than
  s3prl's. The draws are the same distribution as s3prl's `randperm` / `random` calls, from the
  method's generator.
- Where overlapping spans are replaced by random frames, the frames of the later-drawn span win
  (s3prl's indexed assignment with repeated indices leaves the winner to the backend).
- s3prl fixes mask_consecutive per run (min = max = 7 in every released config), so one integer
  here; the non-overlapping "bucket" variant (`mask_allow_overlap: False`) is not implemented.
- With frame stacking, the band covers the same mel bins of every stacked frame (s3prl bands the
  concatenated feature vector; the released TERA models use downsample 1, where both agree).
- With no time and no frequency masking s3prl's loss covers every element including padding; here
  every valid frame.
- Input normalisation is the repo's logmel frontend (dataset mean / std) instead of s3prl's
  per-utterance CMVN after scaling each waveform to -25 dB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from sslaudio.config import ConfigError
from sslaudio.encoders.layers import init_bert_
from sslaudio.masking import to_device
from sslaudio.methods import losses
from sslaudio.methods.base import Method, Needs, embedding_signals
from sslaudio.registry import METHODS


@dataclass
class Alteration:
    """The corrupted input and where the loss applies."""

    x: Tensor  # (B, N, C) altered stacked frames
    label: Tensor  # (B, N, C) bool: the loss mask
    selected: Tensor  # (B, N) bool: time-masked frames
    band: Tensor  # (B, F) bool: masked mel bins (all False without frequency masking)
    dice: Tensor  # (B,) the per-utterance 80/10/10 dice


def draw_starts(n_spans: Tensor, n_choices: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Per row, the first k of a random permutation of [0, n_choices) (s3prl's
    `torch.randperm(n_choices)[:k]`), by sorting uniform keys -> (B, k) long. The caller uses the
    first n_spans <= n_choices of each row; positions past n_choices only fill the rest.
    `n_choices` is read on the host (pass it on the CPU: no device read)."""
    B = n_spans.shape[0]
    w = max(int(n_choices.max()) if B else 1, k, 1)
    key = torch.rand((B, w), generator=generator, device=generator.device)
    outside = torch.arange(w, device=key.device)[None, :] >= to_device(n_choices, key.device)[:, None]
    return key.masked_fill(outside, 2.0).argsort(dim=1)[:, :k]


def alter(x: Tensor, lengths: Tensor, n_freq: int, generator: torch.Generator, *,
          mask_proportion: float = 0.15, mask_consecutive: int = 7, zero_prob: float = 0.8,
          random_prob: float = 0.1, mask_frequency: float = 0.0, noise_proportion: float = 0.0,
          noise_std: float = 0.2) -> Alteration:
    """s3prl's masked-acoustic-model alteration of (B, N, C) stacked frames with (B,) valid lengths;
    C = n_freq * frames per token. See the module docstring. Every draw from `generator`."""
    B, N, C = x.shape
    dev, gdev = x.device, generator.device
    # the span counts come from the lengths alone: worked out on the host (training passes CPU
    # lengths), so the draw widths need no device read
    host_len = lengths.cpu()
    c = mask_consecutive
    pos = torch.arange(N, device=gdev)
    lengths = to_device(host_len, gdev)
    valid = pos[None, :] < lengths[:, None]  # (B, N)

    # time masking: starts in [0, valid_start_max], valid_start_max = max(len - c - 1, 0)
    n_choices = (host_len - c).clamp_min(1)
    n_spans = torch.round(host_len.double() * mask_proportion / c).long()  # half to even, as round()
    n_spans = torch.minimum(n_spans, n_choices)  # randperm(n_choices)[:n_spans]
    k = max(int(n_spans.max()) if B else 0, 1)  # one unused column when nothing is drawn
    starts = draw_starts(n_spans, n_choices, k, generator)  # (B, k)
    sources = draw_starts(n_spans, n_choices, k, generator)  # (B, k) random-frame spans
    n_spans = to_device(n_spans, gdev)
    dice = torch.rand((B,), generator=generator, device=gdev)
    used = torch.arange(k, device=gdev)[None, :] < n_spans[:, None]  # (B, k)
    offset = pos[None, None, :] - starts[:, :, None]  # (B, k, N) frame - span start
    cover = used[:, :, None] & (offset >= 0) & (offset < c)
    selected = cover.any(1) & valid  # (B, N)
    # the last span covering a frame decides its source frame (random-frame branch)
    rank = torch.arange(1, k + 1, device=gdev)[None, :, None]
    last = (cover * rank).argmax(1, keepdim=True)  # (B, 1, N)
    src_start = torch.gather(sources[:, :, None].expand(-1, -1, N), 1, last)[:, 0]
    span_start = torch.gather(starts[:, :, None].expand(-1, -1, N), 1, last)[:, 0]
    src = torch.where(selected, src_start + pos[None, :] - span_start, pos[None, :])  # (B, N)

    zero = (dice < zero_prob)[:, None] & selected
    swap = ((dice >= zero_prob) & (dice < zero_prob + random_prob))[:, None] & selected
    swapped = torch.gather(x, 1, src.to(dev)[:, :, None].expand(-1, -1, C))
    out = torch.where(swap.to(dev)[:, :, None], swapped, x)
    out = out.masked_fill(zero.to(dev)[:, :, None], 0.0)
    label = selected[:, :, None].expand(-1, -1, C)

    # frequency masking: width U{0..max_width}, start U{0..F - width - 1}, every frame
    band = torch.zeros(B, n_freq, dtype=torch.bool, device=gdev)
    if mask_frequency > 0:
        max_width = int(n_freq * mask_frequency)
        width = (torch.rand((B,), generator=generator, device=gdev) * (max_width + 1)).floor().long()
        f0 = (torch.rand((B,), generator=generator, device=gdev) * (n_freq - width)).floor().long()
        bins = torch.arange(n_freq, device=gdev)[None, :]
        band = (bins >= f0[:, None]) & (bins < (f0 + width)[:, None])  # (B, F)
        band_c = band.repeat(1, C // n_freq)  # the same bins in every stacked frame
        out = out.masked_fill(band_c.to(dev)[:, None, :], 0.0)
        label = label | (band_c[:, None, :] & valid[:, :, None])
    elif mask_proportion == 0:  # nothing altered: s3prl reconstructs everything
        label = valid[:, :, None].expand(-1, -1, C)

    # magnitude alteration: one dice for the batch, noise on every frame
    if noise_proportion > 0:
        on = torch.rand((1,), generator=generator, device=gdev) < noise_proportion
        noise = torch.randn((B, N, C), generator=generator, device=gdev) * noise_std
        out = out + (noise * on).to(device=dev, dtype=out.dtype)
    return Alteration(x=out, label=label.to(dev), selected=selected.to(dev), band=band.to(dev),
                      dice=dice.to(dev))


class SpecPredictionHead(nn.Sequential):
    """s3prl `TransformerSpecPredictionHead`: Linear D -> D, GELU, LayerNorm, Linear D -> out."""

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-12):
        super().__init__(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=norm_eps),
                         nn.Linear(dim, out_dim))
        init_bert_(self)


@METHODS.register("mockingjay")
class Mockingjay(Method):
    """Masked acoustic model (time masking); `tera` adds frequency and magnitude alteration."""

    @dataclass
    class Config:
        mask_proportion: float = 0.15  # s3prl task.mask_proportion
        mask_consecutive: int = 7  # mask_consecutive_min = max
        zero_prob: float = 0.8  # per-utterance dice: zero the selected frames
        random_prob: float = 0.1  # ... replace them with other frames (else leave them)
        mask_frequency: float = 0.0  # max fraction of mel bins in the zeroed band (TERA 0.2)
        noise_proportion: float = 0.0  # probability of Gaussian noise on a batch (TERA config 0.15)
        noise_std: float = 0.2  # s3prl Normal(0, 0.2)
        loss: Literal["l1", "mse"] = "l1"  # task.loss L1

        def __post_init__(self):
            if not 0.0 <= self.mask_proportion < 1.0:
                raise ConfigError(f"method.mask_proportion must be in [0, 1), found {self.mask_proportion}")
            if self.mask_consecutive < 1:
                raise ConfigError(f"method.mask_consecutive must be >= 1, found {self.mask_consecutive}")
            if not (0.0 <= self.zero_prob and 0.0 <= self.random_prob and self.zero_prob + self.random_prob <= 1.0):
                raise ConfigError("method.zero_prob and method.random_prob must be >= 0 with a sum <= 1, "
                                  f"found {self.zero_prob} and {self.random_prob}")
            if not 0.0 <= self.mask_frequency < 1.0:
                raise ConfigError(f"method.mask_frequency must be in [0, 1), found {self.mask_frequency}")
            if not 0.0 <= self.noise_proportion <= 1.0:
                raise ConfigError(f"method.noise_proportion must be in [0, 1], found {self.noise_proportion}")
            if self.noise_std < 0:
                raise ConfigError(f"method.noise_std must be >= 0, found {self.noise_std}")
            if self.loss not in ("l1", "mse"):
                raise ConfigError(f"method.loss: {self.loss!r} is not one of ['l1', 'mse']")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=("logmel",), encoder=("frame_transformer",), masker="none", segments=1)

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        self.head = SpecPredictionHead(encoder.dim, encoder.input_dim, encoder.cfg.norm_eps)

    def alter(self, frames: Tensor, lengths: Tensor, generator: torch.Generator) -> Alteration:
        c = self.cfg
        return alter(frames, lengths, self.encoder.n_freq, generator, mask_proportion=c.mask_proportion,
                     mask_consecutive=c.mask_consecutive, zero_prob=c.zero_prob, random_prob=c.random_prob,
                     mask_frequency=c.mask_frequency, noise_proportion=c.noise_proportion,
                     noise_std=c.noise_std)

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        enc = self.encoder
        x = self.features(batch["audio"][:, 0])  # (B, F, T)
        target = enc.stack_frames(x)  # (B, N, F * r)
        B, N, _ = target.shape
        lengths = torch.full((B,), N, dtype=torch.long)  # tokens, on the host: whole crops
        alt = self.alter(target, lengths, generator)
        out = enc(enc.unstack_frames(alt.x), None)  # no padding for the encoder to check
        pred = self.head(out.tokens)  # (B, N, F * r)
        loss = losses.masked_reconstruction_loss(pred, target, alt.label, self.cfg.loss)
        return {
            "loss": loss,
            "altered_frac": alt.selected.float().mean(),  # time-masked frames (~ mask_proportion)
            "loss_frac": alt.label.float().mean(),  # elements in the loss (+ the band for TERA)
            **embedding_signals(out.tokens.reshape(-1, out.tokens.shape[-1])),  # over frames
        }


@METHODS.register("tera")
class TERA(Mockingjay):
    """Mockingjay plus a zeroed frequency band (and optional noise): TERA's alterations."""

    @dataclass
    class Config(Mockingjay.Config):
        mask_frequency: float = 0.2  # s3prl tera config_model.yaml mask_frequency
