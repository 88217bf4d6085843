"""Frame-level transformer on log-mel frames: the Mockingjay / TERA encoder.

Liu, Yang, Chi, Hsu, Lee. "Mockingjay: Unsupervised Speech Representation Learning with Deep
Bidirectional Transformer Encoders", ICASSP 2020; Liu, Li, Lee. "TERA: Self-Supervised Learning of
Transformer Encoder Representation for Speech", IEEE/ACM TASLP 2021. Official code: s3prl
(github.com/s3prl/s3prl) s3prl/upstream/mockingjay/model.py (`TransformerModel`,
`TransformerInputRepresentations`, BERT-style post-LN `TransformerLayer`) and
s3prl/pretrain/mockingjay/task.py (`fast_position_encoding`).

(B, F, T) log-mel -> optional stacking of `downsample` consecutive frames into one (B, T // r,
F * r) vector per token (s3prl `downsample_rate`; the frames left over at the end are dropped)
-> Linear (F * r -> D) + fixed sinusoidal positions -> LayerNorm -> dropout -> L post-LN BERT
blocks -> (B, T // r, D). Positions are the interleaved sin / cos table of s3prl
(`get_sinusoid_table`: dim 2i sin, 2i + 1 cos, angle pos / 10000^(2i / D)), computed for any length
(s3prl caps it at MAX_SEQLEN 3000). Padded frames are left out of attention, so a padded batch gives
each item's own result.

Masks: Mockingjay and TERA alter the input frames themselves (zeros, other frames, a zeroed
frequency band, noise), so the method corrupts the spectrogram and calls the encoder without a
`Mask`. With `mask_token: true` the encoder also takes a replace-mode `Mask` (the log-mel tiny
versions of wav2vec 2.0 and HuBERT): hidden tokens are swapped, after the input projection and
before the positions, for a learned vector (uniform init, as fairseq's mask_emb); `features` is
then the stacked input frames (the log-mel stand-in for wav2vec 2.0's conv features; with
`feature_norm` layer-normed per frame first, as fairseq normalises the conv features) and `local`
the projected tokens before the swap. With `return_layers`, `layers` holds the blocks' input and the
output of every block (as s3prl's `output_all_encoded_layers` lists them, the input representation first).
"""

from __future__ import annotations

from dataclasses import dataclass

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
from sslaudio.encoders.layers import (
    Block,
    TransformerStack,
    check_eval_blocks,
    init_bert_,
    sincos_1d,
)
from sslaudio.registry import ENCODERS


def sinusoid_positions(n: Tensor | int, dim: int) -> Tensor:
    """s3prl's position table for positions 0..n-1 -> (n, dim) float64 on the CPU:
    [sin(p w_0), cos(p w_0), sin(p w_1), cos(p w_1), ...] with w_i = 1 / 10000^(2i / dim)."""
    table = sincos_1d(dim, torch.arange(n))  # (n, dim): [sin | cos] blocks, same frequencies
    return table.reshape(-1, 2, dim // 2).transpose(1, 2).reshape(-1, dim)


_POS_CACHE: dict[tuple, Tensor] = {}


@ENCODERS.register("frame_transformer")
class FrameTransformer(Encoder):
    """(B, F, T) log-mel -> (B, T // downsample, D) frame tokens. EncoderOut: `lengths` (B,) valid
    tokens, `ffn` per-block FFN outputs (with return_layers)."""

    @dataclass
    class Config:
        dim: int = 768  # s3prl hidden_size
        depth: int = 3  # num_hidden_layers (Mockingjay / TERA Base)
        heads: int = 12  # num_attention_heads
        ffn_dim: int = 3072  # intermediate_size
        downsample: int = 1  # frames stacked per token (s3prl downsample_rate)
        dropout: float = 0.1  # hidden_dropout_prob: input representation, attention and FFN outputs
        attention_dropout: float = 0.1  # attention_probs_dropout_prob
        norm_eps: float = 1e-12  # layer_norm_eps
        mask_token: bool = False  # a learned vector for replace-mode masks (wav2vec 2.0 / HuBERT on log-mel)
        # LayerNorm (eps 1e-5, affine) over each stacked input frame before the input projection, and
        # `features` the normed frames: fairseq's `layer_norm` on the conv features, which wav2vec 2.0
        # and HuBERT apply before post_extract_proj and (wav2vec 2.0) the quantizer. s3prl's
        # Mockingjay / TERA have none.
        feature_norm: bool = False
        # embeddings (extract, probe, export, HEAR, random baselines: the encoder inside an
        # EncoderBundle) put the outputs of the last `eval_blocks` blocks side by side, for models
        # evaluated on a learned weighted sum of their layers (the Mockingjay paper's LARGE-WS
        # features; SUPERB, s3prl's Featurizer): a linear probe on the concatenation can learn any
        # such sum. 1: the last block's output; depth + 1: every hidden state, the blocks' input
        # (layer 0, as `--layer` counts) too, SUPERB's set.
        # Training (methods call the encoder directly) always sees the last block alone.
        eval_blocks: int = 1

        def __post_init__(self):
            if self.depth < 1 or self.heads < 1 or self.ffn_dim < 1:
                raise ConfigError("encoder.depth, encoder.heads and encoder.ffn_dim must be >= 1")
            check_range("encoder.dim", self.dim, low=1)  # 0 passed the divisibility checks
            if self.dim % self.heads:
                raise ConfigError(f"encoder.dim {self.dim} must be divisible by encoder.heads {self.heads}")
            if self.dim % 2:
                raise ConfigError(f"encoder.dim {self.dim} must be even (sinusoidal positions)")
            if self.downsample < 1:
                raise ConfigError(f"encoder.downsample must be >= 1 (frames per token), found {self.downsample}")
            for key in ("dropout", "attention_dropout"):
                if not 0.0 <= getattr(self, key) < 1.0:
                    raise ConfigError(f"encoder.{key} must be in [0, 1), found {getattr(self, key)}")
            if self.norm_eps <= 0:
                raise ConfigError(f"encoder.norm_eps must be positive, found {self.norm_eps}")
            check_eval_blocks(self.eval_blocks, self.depth)

    def __init__(self, cfg: "FrameTransformer.Config", frontend):
        super().__init__()
        self.cfg = cfg
        self.n_freq = int(frontend.out_channels)
        if self.n_freq < 2:
            raise ConfigError("encoder.name: 'frame_transformer' reads spectrogram frames; use a "
                              "spectrogram frontend (frontend.name: logmel)")
        self.stack = cfg.downsample
        self.input_dim = self.n_freq * self.stack
        self.dim = cfg.dim
        self.concat_blocks = 1  # blocks side by side in the output tokens (see embedding_blocks)
        self.downsample = int(frontend.hop) * self.stack
        self.sample_rate = int(frontend.sample_rate)

        self.feature_norm = nn.LayerNorm(self.input_dim) if cfg.feature_norm else None
        self.input_proj = nn.Linear(self.input_dim, cfg.dim)  # s3prl spec_transform
        self.input_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.blocks = TransformerStack([
            Block(cfg.dim, cfg.heads, cfg.ffn_dim, dropout=cfg.dropout,
                  attention_dropout=cfg.attention_dropout, norm_first=False, norm_eps=cfg.norm_eps)
            for _ in range(cfg.depth)])
        init_bert_(self)  # s3prl init_Transformer_weights: Linear N(0, 0.02), zero bias, unit LayerNorm
        if cfg.mask_token:
            self.mask_emb = nn.Parameter(torch.empty(cfg.dim).uniform_())

    @property
    def frame_dim(self) -> int:
        return self.cfg.dim * self.concat_blocks

    def embedding_blocks(self, on: bool) -> None:
        """Output tokens of width eval_blocks * dim, the last eval_blocks blocks' outputs side by
        side (on; EncoderBundle turns it on), or the last block's (off, what methods train)."""
        self.concat_blocks = self.cfg.eval_blocks if on else 1

    # ---- helpers for methods ----

    def stack_frames(self, x: Tensor) -> Tensor:
        """(B, F, T) -> (B, T // r, F * r): r consecutive frames concatenated per token, frame by
        frame ([f_0 bins, f_1 bins, ...], s3prl `down_sample_frames`); left-over frames dropped."""
        h = x.transpose(1, 2)  # (B, T, F)
        r = self.stack
        if r == 1:
            return h
        n = h.shape[1] // r
        return h[:, : n * r].reshape(h.shape[0], -1, r * h.shape[2])

    def unstack_frames(self, h: Tensor) -> Tensor:
        """Inverse of `stack_frames`: (B, N, F * r) -> (B, F, N * r)."""
        return h.reshape(h.shape[0], -1, self.n_freq).transpose(1, 2)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """(B,) valid frames -> (B,) valid tokens."""
        return torch.div(lengths, self.stack, rounding_mode="floor")

    def frame_times(self, n_frames: int) -> Tensor:
        """Centre in seconds of each token: the mean centre of its stacked frames, frame i of the
        centred STFT being centred at i * hop."""
        return stft_frame_times(n_frames, self.downsample // self.stack, self.stack, self.sample_rate)

    def positions(self, n: int, like: Tensor) -> Tensor:
        """(n, D) positions in the dtype and device of `like`; cached outside tracing."""
        if torch.jit.is_tracing():  # export: built from the traced length
            return sinusoid_positions(n, self.dim).to(device=like.device, dtype=like.dtype)
        key = (int(n), self.dim, str(like.device), like.dtype)
        if key not in _POS_CACHE:
            if len(_POS_CACHE) > 64:
                _POS_CACHE.clear()
            _POS_CACHE[key] = sinusoid_positions(int(n), self.dim).to(device=like.device, dtype=like.dtype)
        return _POS_CACHE[key]

    # ---- forward ----

    def forward(self, x: Tensor, lengths: Tensor | None = None, mask=None,
                return_layers: bool = False) -> EncoderOut:
        if mask is not None and not (self.cfg.mask_token and mask.mode == "replace"):
            raise ValueError("frame_transformer takes a Mask only in replace mode with encoder.mask_token: "
                             "true (Mockingjay / TERA alter the input frames themselves)")
        check_input("frame_transformer", x, lengths, self.n_freq, self.stack, "one token of encoder.downsample frames")
        frames = self.stack_frames(x)  # (B, N, F * r)
        if self.feature_norm is not None:
            frames = self.feature_norm(frames)
        n = frames.shape[1]
        local = self.input_proj(frames)  # (B, N, D)
        h = local
        if mask is not None:
            hidden = mask.masked.to(h.device)
            if hidden.shape != h.shape[:2]:
                raise ValueError(f"frame_transformer: mask shape {tuple(hidden.shape)} does not fit "
                                 f"{tuple(h.shape[:2])} tokens")
            h = torch.where(hidden.unsqueeze(-1), self.mask_emb.to(h.dtype), h)
        h = self.input_dropout(self.input_norm(h + self.positions(n, h)))
        padding, token_lengths = None, None
        if lengths is not None:
            token_lengths = self.output_lengths(lengths.to(h.device))
            padding = lengths_to_padding(token_lengths, n)  # (B, N)
        attn_padding = padding if padding is not None and bool(padding.any()) else None
        n_cat = self.concat_blocks
        h, layers, ffns = self.blocks(h, attn_padding, return_layers=return_layers or n_cat > 1)
        if n_cat > 1:
            h = torch.cat(layers[-n_cat:], -1)
        return EncoderOut(tokens=h, padding=padding, layers=layers if return_layers else None,
                          ffn=ffns if return_layers else None, lengths=token_lengths, grid=(n,),
                          local=local, features=frames,
                          frame_padding=padding)
