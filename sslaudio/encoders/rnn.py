"""Unidirectional GRU stack on spectrogram frames: the APC encoder.

Chung, Hsu, Tang, Glass. "An Unsupervised Autoregressive Model for Speech Representation
Learning", Interspeech 2019; official code github.com/iamyuanchung/Autoregressive-Predictive-Coding
(apc_model.py `Prenet`, `APCModel`; train_apc.py flags) and s3prl (pretrain/apc/config_model.yaml,
upstream/apc).

log-mel (B, F, T) -> frames (B, T, F) -> optional prenet (Linear - ReLU - Dropout per layer, width H;
off by default: "all APC models in the paper DO NOT incorporate a prenet") -> L GRU layers of width
H, each one layer of its own (as the official ModuleList, so the residual path can go between
them). After every layer but the last, dropout (official `rnn_dropout`); then, where the layer's
input and output widths agree (official `residual: true`), the layer input is added. The tokens
are the last layer's outputs, the representation the paper probes (README: `feats[-1]`);
`return_layers` gives every layer's output (the prenet output first when there is one, as the
official `internal_reps`). The postnet that predicts future frames belongs to the method.

Padding: no packing. A unidirectional GRU's output at step t depends on steps <= t only, so the
valid outputs of a padded item equal those of the item alone whatever the padding holds (tested);
padded steps are flagged in `EncoderOut.padding` and excluded by the pooling and the losses. The
official pack_padded_sequence gives the same valid outputs; without it the graph traces and
exports to ONNX for any length.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@ENCODERS.register("rnn")
class RNN(Encoder):
    @dataclass
    class Config:
        layers: int = 3  # official rnn_num_layers
        hidden: int = 512  # official rnn_hidden_size
        residual: bool = True  # official --rnn_residual (off unless given; the paper and s3prl use it)
        dropout: float = 0.0  # official rnn_dropout default; s3prl uses 0.1
        prenet_layers: int = 0  # official prenet_num_layers (0: no prenet, as in the paper)
        prenet_dropout: float = 0.0

        def __post_init__(self):
            if self.layers < 1 or self.hidden < 1:
                raise ConfigError(f"encoder.layers and encoder.hidden must be >= 1, found {self.layers}, "
                                  f"{self.hidden}")
            if self.prenet_layers < 0:
                raise ConfigError(f"encoder.prenet_layers must be >= 0, found {self.prenet_layers}")
            for key in ("dropout", "prenet_dropout"):
                if not 0.0 <= getattr(self, key) < 1.0:
                    raise ConfigError(f"encoder.{key} must be in [0, 1), found {getattr(self, key)}")

    def __init__(self, cfg: Config, frontend):
        super().__init__()
        n_in = int(frontend.out_channels)
        if n_in == 1 and int(frontend.hop) == 1:
            raise ConfigError("encoder.name: 'rnn' reads spectrogram frames; use a spectrogram frontend "
                              "(frontend.name: logmel)")
        self.cfg = cfg
        self.in_dim = n_in
        prenet: list[nn.Module] = []
        for i in range(cfg.prenet_layers):
            prenet += [nn.Linear(n_in if i == 0 else cfg.hidden, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.prenet_dropout)]
        self.prenet = nn.Sequential(*prenet) if prenet else None
        first = cfg.hidden if self.prenet is not None else n_in
        self.grus = nn.ModuleList([nn.GRU(first if i == 0 else cfg.hidden, cfg.hidden, batch_first=True)
                                   for i in range(cfg.layers)])
        self.dropout = nn.Dropout(cfg.dropout)
        self.dim = self.frame_dim = cfg.hidden
        self.downsample = int(frontend.hop)  # one output per input frame
        self.sample_rate = int(frontend.sample_rate)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """One output per input frame."""
        return lengths

    def frame_times(self, n_frames: int) -> Tensor:
        """Frame t of a centred STFT (the logmel frontend) is centred on sample t * hop."""
        return stft_frame_times(n_frames, self.downsample, 1, self.sample_rate)

    def forward(self, x: Tensor, lengths: Tensor | None = None, mask=None, return_layers: bool = False) -> EncoderOut:
        if mask is not None:
            raise ValueError("rnn: token masks are not supported (APC predicts future frames instead)")
        check_input("rnn", x, lengths, self.in_dim, 1, "one output frame")
        padding = None
        if lengths is not None:
            padding = lengths_to_padding(lengths.to(x.device), x.shape[-1])
        h = x.transpose(1, 2)  # (B, T, F)
        layers: list[Tensor] = []
        if self.prenet is not None:
            h = self.prenet(h)  # (B, T, H)
            layers.append(h)
        last = len(self.grus) - 1
        for i, gru in enumerate(self.grus):
            y, _ = gru(h)  # (B, T, H); step t sees steps <= t only
            if i < last:
                y = self.dropout(y)  # official: dropout on every layer's output but the last
            if self.cfg.residual and h.shape[-1] == y.shape[-1]:
                y = y + h
            layers.append(y)
            h = y
        return EncoderOut(tokens=h, padding=padding, layers=layers if return_layers else None)
