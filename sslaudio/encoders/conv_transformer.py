"""wav2vec 2.0 / HuBERT / data2vec audio encoder: conv feature extractor + transformer.

waveform (B, S) -> conv features (B, T, C) -> LayerNorm -> Linear to D (+ dropout) -> [mask]
(the Linear only when C != D unless `always_project`, as data2vec's post_extract_proj)
-> + conv positional embedding -> transformer (post-LN by default, pre-LN with
`layer_norm_first`) -> (B, T, D). Baevski et al. 2020 (wav2vec 2.0), Hsu et al. 2021 (HuBERT),
Baevski et al. 2022 (data2vec); official code: fairseq `models/wav2vec/wav2vec2.py`,
`examples/data2vec/models/data2vec_audio.py`.

Masks: replace mode swaps hidden frames for a learned vector (uniform init, as fairseq); keep mode
(data2vec 2.0) zeroes hidden frames, computes the positional conv over the whole sequence, then
keeps only the visible frames for the transformer. A mask whose batch is K times the input's
(data2vec 2.0 `clone_batch`) reuses the conv features for the K copies (rows b * K + k).

Padding: padded batches give each item's own outputs (masked GroupNorm, padded frames zeroed before
every positional conv). `official_padding` (set by `sslaudio import`) reproduces fairseq /
transformers instead: the first GroupNorm counts the padding, padded frames are zeroed once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from sslaudio.config import ConfigError, check_range
from sslaudio.encoders.base import (
    Encoder,
    EncoderOut,
    check_input,
    clone_for_mask,
    lengths_to_padding,
)
from sslaudio.encoders.layers import (
    WAV2VEC2_CONV_LAYERS,
    Block,
    ConvFeatureExtractor,
    ConvPositionalEmbedding,
    TransformerStack,
    alibi_bias,
    alibi_slopes,
    gather_tokens,
    init_bert_,
    scale_grad,
    zero_padded,
)
from sslaudio.registry import ENCODERS


@ENCODERS.register("conv_transformer")
class ConvTransformer(Encoder):
    """(B, S) waveform -> (B, T, D) frames, one per `downsample` samples. EncoderOut: `features`
    (B, T, C) layer-normed conv features (the wav2vec 2.0 quantizer input), `features_pen` (the
    feature penalty), `local` (B, T, D) projected features before dropout and masks, `lengths`,
    `frame_padding` (before keep masks), `keep`, `clone`, `ffn` (with return_layers)."""

    @dataclass
    class Config:
        conv_layers: list[tuple[int, int, int]] = field(default_factory=lambda: list(WAV2VEC2_CONV_LAYERS))
        extractor_mode: Literal["group", "layer"] = "group"  # fairseq "default" / "layer_norm"
        conv_bias: bool = False
        dim: int = 768
        depth: int = 12
        heads: int = 12
        ffn_dim: int = 3072
        dropout: float = 0.1
        attention_dropout: float = 0.1
        activation_dropout: float = 0.0
        input_dropout: float = 0.1  # fairseq dropout_input, after the projection
        layerdrop: float = 0.05
        layer_norm_first: bool = False
        pos_conv_kernel: int = 128
        pos_conv_groups: int = 16
        pos_conv_depth: int = 1  # data2vec: 5 layers sharing kernel 95 (19 each)
        feature_grad_mult: float = 1.0  # 0.1 for wav2vec 2.0 Base
        # data2vec 2.0 audio: ALiBi attention bias with a learned per-head scale (init 1, clamped
        # at 0), on top of the conv positions (fairseq use_alibi_encoder, learned_alibi_scale)
        alibi: bool = False
        # build the feature projection even when the conv width equals `dim` (fairseq data2vec_audio
        # always builds post_extract_proj; wav2vec 2.0 only when the widths differ)
        always_project: bool = False
        # fairseq / transformers padding (imported official models): the first GroupNorm of the
        # conv extractor also normalises over the padded frames, and padded frames are zeroed once
        # before the positional conv (not before each of its layers). Off: padding-invariant.
        official_padding: bool = False

        def __post_init__(self):
            if not self.conv_layers or any(len(c) != 3 or min(c) < 1 for c in self.conv_layers):
                raise ConfigError("encoder.conv_layers must be a non-empty list of positive "
                                  "[channels, kernel, stride] triples")
            if self.depth < 1 or self.heads < 1 or self.ffn_dim < 1:
                raise ConfigError("encoder.depth, encoder.heads and encoder.ffn_dim must be >= 1")
            check_range("encoder.dim", self.dim, low=1)  # 0 passed the divisibility checks
            check_range("encoder.pos_conv_groups", self.pos_conv_groups, low=1)
            if self.dim % self.heads:
                raise ConfigError(f"encoder.dim {self.dim} must be divisible by encoder.heads {self.heads}")
            if self.dim % self.pos_conv_groups:
                raise ConfigError(f"encoder.pos_conv_groups {self.pos_conv_groups} must divide "
                                  f"encoder.dim {self.dim}")
            if self.pos_conv_kernel < 1 or self.pos_conv_depth < 1:
                raise ConfigError("encoder.pos_conv_kernel and encoder.pos_conv_depth must be >= 1")
            for key in ("dropout", "attention_dropout", "activation_dropout", "input_dropout", "layerdrop"):
                if not 0.0 <= getattr(self, key) < 1.0:
                    raise ConfigError(f"encoder.{key} must be in [0, 1), found {getattr(self, key)}")
            if self.feature_grad_mult < 0:
                raise ConfigError(f"encoder.feature_grad_mult must be >= 0, found {self.feature_grad_mult}")

    def __init__(self, cfg: "ConvTransformer.Config", frontend):
        super().__init__()
        if int(frontend.out_channels) != 1 or int(frontend.hop) != 1:
            raise ConfigError("encoder.name: 'conv_transformer' reads the raw waveform; use the "
                              "waveform frontend (frontend.name: waveform)")
        self.cfg = cfg
        self.extractor = ConvFeatureExtractor(cfg.conv_layers, cfg.extractor_mode, cfg.conv_bias)
        c = self.extractor.out_channels
        self.feature_norm = nn.LayerNorm(c)
        self.project = nn.Linear(c, cfg.dim) if c != cfg.dim or cfg.always_project else nn.Identity()
        self.input_dropout = nn.Dropout(cfg.input_dropout)
        self.mask_emb = nn.Parameter(torch.empty(cfg.dim).uniform_())
        self.pos_conv = ConvPositionalEmbedding(cfg.dim, cfg.pos_conv_kernel, cfg.pos_conv_groups,
                                                cfg.pos_conv_depth)
        self.norm = nn.LayerNorm(cfg.dim)  # after positions (post-LN) or at the end (pre-LN)
        if cfg.alibi:
            self.register_buffer("alibi_slopes", torch.tensor(alibi_slopes(cfg.heads)), persistent=False)
            self.alibi_scale = nn.Parameter(torch.ones(cfg.heads))
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = TransformerStack([
            Block(cfg.dim, cfg.heads, cfg.ffn_dim, dropout=cfg.dropout,
                  attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout,
                  norm_first=cfg.layer_norm_first)
            for _ in range(cfg.depth)], layerdrop=cfg.layerdrop)
        init_bert_(self.blocks)
        if isinstance(self.project, nn.Linear):
            init_bert_(self.project)

        self.dim = cfg.dim
        self.frame_dim = cfg.dim
        self.downsample = self.extractor.stride
        self.receptive_field = self.extractor.receptive_field
        self.sample_rate = int(frontend.sample_rate)

    # ---- helpers for methods ----

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """(B,) valid samples -> (B,) valid frames."""
        return self.extractor.output_lengths(lengths)

    def frame_times(self, n_frames: int) -> Tensor:
        """Centre in seconds of each frame's receptive field."""
        t = torch.arange(n_frames, dtype=torch.float64) * self.downsample + self.receptive_field / 2
        return t / self.sample_rate

    def attention_bias(self, positions: Tensor) -> Tensor | None:
        """(B, N) frame positions of the tokens -> (B, H, N, N) ALiBi bias, or None without ALiBi."""
        if not self.cfg.alibi:
            return None
        return alibi_bias(positions, self.alibi_slopes * self.alibi_scale.clamp_min(0))

    # ---- forward ----

    def forward(self, x: Tensor, lengths: Tensor | None = None, mask=None, return_layers: bool = False) -> EncoderOut:
        unpadded = lengths is None  # every item spans the whole input: nothing to read on the device
        check_input("conv_transformer", x, lengths, None, self.receptive_field, "one frame's receptive field")
        B = x.shape[0]
        m = self.cfg.feature_grad_mult
        # official padding: the extractor's GroupNorm sees the padded input as one full-length item
        norm_lengths = None if unpadded or self.cfg.official_padding else lengths
        if m == 0.0:
            with torch.no_grad():
                feats, frame_lengths = self.extractor(x, norm_lengths)
        else:
            feats, frame_lengths = self.extractor(x, norm_lengths)
            feats = scale_grad(feats, m)
        feats = feats.transpose(1, 2)  # (B, T, C)
        T = feats.shape[1]
        if unpadded:
            frame_lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
        elif self.cfg.official_padding:
            frame_lengths = self.extractor.output_lengths(lengths)
        frame_padding = lengths_to_padding(frame_lengths, T)
        valid = (~frame_padding).unsqueeze(-1).to(feats.dtype)
        features_pen = (feats.float().pow(2) * valid).sum() / (valid.sum() * feats.shape[-1]).clamp_min(1)
        features = self.feature_norm(feats)
        projected = self.project(features)
        h = self.input_dropout(projected)

        clone, keep_idx, padding = 1, None, frame_padding
        pos_in = h
        if mask is not None:
            h, padding, clone = clone_for_mask(h, padding, mask, "conv_transformer", f"{T} frames")
            hidden = mask.masked.to(h.device)
            if mask.mode == "replace":
                h = torch.where(hidden.unsqueeze(-1), self.mask_emb.to(h.dtype), h)
                pos_in = h
            else:
                keep_idx = mask.keep_idx.to(h.device)
                pos_in = zero_padded(h, hidden)  # data2vec 2.0: positions see zeros at hidden frames
        h, padding, layers, ffns = self.context(h, padding, pos_in, keep_idx, return_layers=return_layers,
                                                unpadded=unpadded)
        return EncoderOut(tokens=h, padding=padding, layers=layers if return_layers else None,
                          ffn=ffns if return_layers else None, grid=(T,), lengths=frame_lengths,
                          frame_padding=frame_padding, keep=keep_idx is not None, clone=clone,
                          local=projected, features=features, features_pen=features_pen)

    def context(self, h: Tensor, padding: Tensor, pos_in: Tensor | None = None, keep_idx: Tensor | None = None,
                parts: tuple[nn.Module, nn.Module, nn.Module] | None = None, return_layers: bool = False,
                unpadded: bool = False) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """The context network on projected features h (B, T, D) with padding (B, T): conv
        positions over the whole sequence (computed from `pos_in`, default h), then only the
        `keep_idx` tokens when given, LayerNorm (post-LN), dropout, the blocks with ALiBi, final
        LayerNorm (pre-LN) -> (tokens, padding, the blocks' input and per-block outputs, per-block FFN
        outputs).
        `parts` = (pos_conv, norm, blocks) runs other copies of them without dropout (the data2vec
        EMA teacher). `unpadded`: the caller knows `padding` is all False (no host read of it)."""
        pos_conv, norm, blocks = (self.pos_conv, self.norm, self.blocks) if parts is None else parts
        pos_in = h if pos_in is None else pos_in
        if self.cfg.official_padding:  # zeroed once, then the positional conv layers see no padding
            h = zero_padded(h, padding) + pos_conv(zero_padded(pos_in, padding), None)
        else:
            h = zero_padded(h, padding) + pos_conv(pos_in, padding)
        if keep_idx is not None:
            h = gather_tokens(h, keep_idx)
            padding = torch.gather(padding, 1, keep_idx)
        if not self.cfg.layer_norm_first:
            h = norm(h)
        if parts is None:
            h = self.dropout(h)
        attn_padding = None if unpadded or not bool(padding.any()) else padding
        bias = None
        if self.cfg.alibi:  # positions of the kept frames in keep mode, 0..T-1 otherwise
            pos = keep_idx if keep_idx is not None else \
                torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
            bias = self.attention_bias(pos)
        h, layers, ffns = blocks(h, attn_padding, bias, return_layers=return_layers)
        if self.cfg.layer_norm_first:
            h = norm(h)
        return h, padding, layers, ffns
