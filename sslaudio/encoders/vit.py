"""Spectrogram-patch Vision Transformer (Dosovitskiy et al. 2021) as used by MAE-style audio
models: M2D (Niizumi et al. 2023; 16x16 patches on 80 mel bins, official code nttcslab/m2d) and
ATST (Li et al. 2022/2024; 64x4 patches on 64 mel bins).

Tokens follow MAE/M2D patchify order: row-major over the (freq, time) patch grid, index
f * Tg + t. Positions are fixed 2-D sin-cos computed for any grid (`pos: sincos`, default), so clips
longer than the training crop work (`pos_order`: the table's frequency half first, default, or its
time half first as MAE / M2D's get_2d_sincos_pos_embed writes it, for imported M2D weights); or
learned (`pos: learned`, ATST's `pos_type cut`): one vector per patch of the first `pos_len` time
columns, the first Tg of them added to an input of Tg columns. A learned-position ViT encodes an
input of more than pos_len columns in chunks of pos_len columns, each chunk a batch row of its own
(the official ATST extraction, `get_intermediate_layers_chunks` / embedding.py: chunks of the
training length), so it accepts any length; a sincos ViT does the same with `chunk` columns when
that is set (M2D's runtime encodes in chunks of its training input, the length of its fixed
table). The CLS output is then the mean of the chunks' CLS outputs weighted by their valid
columns. A keep mask (MAE/M2D, data2vec 2.0) drops hidden tokens after positions are added; a
replace mask swaps hidden patch embeddings for a learned token before positions.

Clip embedding: the mean of the frames (`Encoder.pool`). With `cls_frames` every frame of
`to_frames` starts with the CLS output, so that mean is [CLS, mean of the patch frames]: ATST-Clip's
clip representation (official get_intermediate_layers_chunks with avgpool), pooled the same way
however the input is chunked, here or by extraction. (With `--layer` the CLS part stays the last
block's.)

Blocks: pre-LN with a final LayerNorm (`norm_first`, default; ViT, MAE, M2D), or post-LN after a
LayerNorm on the input tokens with no final norm (`norm_first: false`; data2vec 2.0 / EAT,
layer_norm_first false), where a block's FFN target is its MLP output before the residual add and
the block's second LayerNorm (fairseq AltBlock).

Multi-mask (data2vec 2.0 `clone_batch`): a mask whose batch is K times the input's encodes every
input K times, patch embedding computed once; rows are ordered b * K + k (`repeat_interleave`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslaudio.config import ConfigError, check_range
from sslaudio.encoders.base import (
    Encoder,
    EncoderOut,
    check_input,
    clone_for_mask,
    lengths_to_padding,
    stft_frame_times,
)
from sslaudio.encoders.layers import (
    Block,
    PatchEmbed,
    TransformerStack,
    check_eval_blocks,
    gather_tokens,
    init_vit_,
    sincos_pos_embed_2d,
    sincos_pos_embed_2d_traced,
)
from sslaudio.frontends import stft_frames
from sslaudio.registry import ENCODERS


@ENCODERS.register("vit")
class ViT(Encoder):
    """(B, F, T) log-mel -> (B, N, D) patch tokens. EncoderOut: `grid` (Fg, Tg), `keep`, `clone`,
    `frame_padding` (B, N) of one input before clones and keep masks, `ffn` (with return_layers),
    `cls` (B, D) when `cls_token` is on (tokens and layers never include it)."""

    @dataclass
    class Config:
        patch: tuple[int, int] = (16, 16)  # (F_p, T_p): mel bins x frames per patch
        dim: int = 768
        depth: int = 12
        heads: int = 12
        mlp_ratio: float = 4.0
        qkv_bias: bool = True
        drop_path: float = 0.0  # stochastic depth, rising linearly to this value in the last block
        norm_eps: float = 1e-6
        cls_token: bool = False
        # True: pre-LN blocks and a final LayerNorm (ViT, MAE, M2D). False: post-LN blocks with a
        # LayerNorm on the block input and no final norm, as data2vec 2.0 / EAT with
        # layer_norm_first false (fairseq AltBlock; BlockEncoder's norm before the blocks;
        # Data2VecMultiModel.norm only built when layer_norm_first)
        norm_first: bool = True
        # "sincos": fixed 2-D positions for any grid; "learned": ATST's pos_type "cut", pos_len
        # columns (ATST-Frame 250 = 10 s of 40 ms patches), longer inputs encoded in chunks of pos_len
        pos: Literal["sincos", "learned"] = "sincos"
        pos_len: int = 250
        # sincos only: encode an input of more than `chunk` patch columns in chunks of `chunk`
        # columns, each with positions from 0, as M2D's runtime (encode_lms: chunks of the training
        # input length, whose fixed table is all it has); 0: one pass over any length
        chunk: int = 0
        # channel order of the sin-cos table: "freq_first" (sslaudio's default), or "time_first",
        # MAE / M2D's get_2d_sincos_pos_embed order (time half first), which imported M2D weights use
        pos_order: Literal["freq_first", "time_first"] = "freq_first"
        # "mae": xavier-uniform Linear weights (MAE, M2D); "trunc_normal": N(0, 0.02) truncated at
        # +-2 for Linear and patch weights, positions, CLS and mask tokens (ATST / DINO _init_weights)
        init: Literal["mae", "trunc_normal"] = "mae"
        # every frame of to_frames starts with the CLS output: clip embedding [CLS, mean] (ATST-Clip)
        cls_frames: bool = False
        # embeddings (extract, probe, export: the encoder inside an EncoderBundle) concatenate the
        # final-norm'd outputs of the last `eval_blocks` blocks, CLS included: ATST's evaluation
        # (audiossl get_intermediate_layers(n) with norm_frame on each block, n_last_blocks 12 in
        # its linear evaluation and embedding.py). 1: the last block's output; depth + 1: every
        # hidden state, the blocks' input (layer 0, as `--layer` counts) through the same norm too,
        # SUPERB's set. Training (methods call the encoder directly) always sees the last block alone.
        eval_blocks: int = 1

        def __post_init__(self):
            if len(self.patch) != 2 or min(self.patch) < 1:
                raise ConfigError(f"encoder.patch must be two positive integers, found {list(self.patch)}")
            if self.depth < 1 or self.heads < 1:
                raise ConfigError("encoder.depth and encoder.heads must be >= 1")
            check_range("encoder.dim", self.dim, low=1)  # 0 passed the divisibility checks
            check_range("encoder.norm_eps", self.norm_eps, low=0, low_open=True)  # < 0: NaN at the first step
            if self.dim % self.heads:
                raise ConfigError(f"encoder.dim {self.dim} must be divisible by encoder.heads {self.heads}")
            if self.dim % 4:
                raise ConfigError(f"encoder.dim {self.dim} must be a multiple of 4 (2-D sin-cos positions)")
            if self.mlp_ratio <= 0:
                raise ConfigError(f"encoder.mlp_ratio must be positive, found {self.mlp_ratio}")
            if not 0.0 <= self.drop_path < 1.0:
                raise ConfigError(f"encoder.drop_path must be in [0, 1), found {self.drop_path}")
            if self.pos not in ("sincos", "learned"):
                raise ConfigError(f"encoder.pos: {self.pos!r} is not one of ['sincos', 'learned']")
            if self.pos_order not in ("freq_first", "time_first"):
                raise ConfigError(f"encoder.pos_order: {self.pos_order!r} is not one of ['freq_first', 'time_first']")
            if self.pos_len < 1:
                raise ConfigError(f"encoder.pos_len must be >= 1, found {self.pos_len}")
            if self.chunk < 0:
                raise ConfigError(f"encoder.chunk must be >= 0 (0: no chunks), found {self.chunk}")
            if self.chunk and self.pos == "learned":
                raise ConfigError("encoder.chunk is for sincos positions; learned positions chunk at encoder.pos_len")
            if self.init not in ("mae", "trunc_normal"):
                raise ConfigError(f"encoder.init: {self.init!r} is not one of ['mae', 'trunc_normal']")
            if self.cls_frames and not self.cls_token:
                raise ConfigError("encoder.cls_frames puts the CLS output into every frame; set encoder.cls_token: true")
            check_eval_blocks(self.eval_blocks, self.depth)

    def __init__(self, cfg: ViT.Config, frontend):
        super().__init__()
        self.cfg = cfg
        fp, tp = cfg.patch
        n_freq = int(frontend.out_channels)
        if n_freq % fp:
            raise ConfigError(f"encoder.patch: frontend gives {n_freq} frequency bins, not divisible by "
                              f"the patch height {fp}")
        self.n_freq = n_freq
        self.freq_grid = n_freq // fp
        self.tokens_per_time = self.freq_grid  # tokens per patch column (Fg)
        self.dim = cfg.dim
        self.concat_blocks = 1  # blocks concatenated into the output tokens (see embedding_blocks)
        self.hop = int(frontend.hop)
        self.downsample = self.hop * tp
        self.sample_rate = int(frontend.sample_rate)
        self._time_first = cfg.pos_order == "time_first"
        # patch columns per chunk: pos_len (learned positions), chunk (sincos), 0 for one pass
        self._chunk_cols = cfg.pos_len if cfg.pos == "learned" else cfg.chunk

        self.patch_embed = PatchEmbed(cfg.patch, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(cfg.dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.cls_token else None
        dpr = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = TransformerStack([
            Block(cfg.dim, cfg.heads, int(cfg.dim * cfg.mlp_ratio), qkv_bias=cfg.qkv_bias,
                  drop_path=dpr[i], norm_first=cfg.norm_first, norm_eps=cfg.norm_eps)
            for i in range(cfg.depth)])
        # pre-LN: final norm after the blocks; post-LN: input norm before them (every block already
        # ends with its own LayerNorm), applied to the CLS token too
        self.input_norm = None if cfg.norm_first else nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.norm_first else nn.Identity()
        self.pos_embed = nn.Parameter(torch.zeros(self.freq_grid, cfg.pos_len, cfg.dim)) \
            if cfg.pos == "learned" else None
        if cfg.init == "trunc_normal":
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            for p in (self.mask_token, self.cls):
                if p is not None:
                    nn.init.trunc_normal_(p, std=0.02)
        else:
            init_vit_(self.blocks)
            nn.init.normal_(self.mask_token, std=0.02)
            if self.cls is not None:
                nn.init.normal_(self.cls, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def frame_dim(self) -> int:
        return (self.freq_grid * self.cfg.dim + (self.cfg.dim if self.cfg.cls_frames else 0)) * self.concat_blocks

    def embedding_blocks(self, on: bool) -> None:
        """Output tokens (and CLS) of width eval_blocks * dim, the final-norm'd outputs of the last
        eval_blocks blocks side by side (on), or the last block's (off, what methods train).
        EncoderBundle turns it on for the encoder it embeds with."""
        self.concat_blocks = self.cfg.eval_blocks if on else 1

    # ---- helpers for methods: grids and padding for maskers, patches for pixel targets ----

    def check_crop(self, samples: int, method: str) -> None:
        """Training crops must fit one chunk (the official crop is the position table's length, and
        a keep mask cannot span chunks): refuse a crop of more than pos_len (learned) or chunk
        (sincos, when set) patch columns."""
        cols, limit = stft_frames(samples, self.hop) // self.cfg.patch[1], self._chunk_cols
        if limit and cols > limit:
            key = "encoder.pos_len" if self.pos_embed is not None else "encoder.chunk"
            raise ConfigError(f"data.clip_seconds: a {samples / self.sample_rate:g} s crop is {cols} patch columns, "
                              f"more than the {limit} of {key}; {method} trains on whole crops, so raise {key} "
                              f"or shorten the crop")

    def token_grid(self, x_shape: tuple[int, ...]) -> tuple[int, int]:
        """(B, F, T) input shape -> (Fg, Tg) token grid."""
        return self.freq_grid, int(x_shape[-1]) // self.cfg.patch[1]

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Valid frames (B,) -> valid patch columns (B,): column j is valid iff (j+1)*T_p <= length."""
        return torch.div(lengths, self.cfg.patch[1], rounding_mode="floor")

    def frame_times(self, n_frames: int) -> Tensor:
        """Patch column j covers STFT frames T_p j .. T_p j + T_p - 1."""
        return stft_frame_times(n_frames, self.hop, self.cfg.patch[1], self.sample_rate)

    def token_padding(self, lengths: Tensor, x_shape: tuple[int, ...]) -> Tensor:
        """(B,) valid frames -> (B, Fg*Tg) bool, True at tokens of padded time columns."""
        fg, tg = self.token_grid(x_shape)
        cols = lengths_to_padding(self.output_lengths(lengths), tg)  # (B, Tg)
        return cols[:, None, :].expand(-1, fg, -1).reshape(cols.shape[0], fg * tg)

    def patchify(self, x: Tensor) -> Tensor:
        """(B, F, T) -> (B, Fg*Tg, F_p*T_p) raw patches in token order (MAE pixel targets)."""
        fp, tp = self.cfg.patch
        B, F_, T = x.shape
        tg = T // tp
        x = x[:, :, : tg * tp].reshape(B, F_ // fp, fp, tg, tp)
        return x.permute(0, 1, 3, 2, 4).reshape(B, (F_ // fp) * tg, fp * tp)

    # ---- forward ----

    def forward(self, x: Tensor, lengths: Tensor | None = None, mask=None, return_layers: bool = False) -> EncoderOut:
        check_input("vit", x, lengths, self.n_freq, self.cfg.patch[1], "one patch column")
        grid = self.token_grid(x.shape)
        tokens = self.patch_embed(x)  # (B, N, D)
        # without lengths, no padding: built from the tokens so a traced graph stays length-free
        padding = torch.zeros_like(tokens[..., 0], dtype=torch.bool) if lengths is None else \
            self.token_padding(lengths, x.shape)
        frame_padding = padding

        clone = 1
        if mask is not None:
            tokens, padding, clone = clone_for_mask(tokens, padding, mask, "vit", f"the token grid {grid}")
            if mask.mode == "replace":
                hidden = mask.masked.to(tokens.device).unsqueeze(-1)
                tokens = torch.where(hidden, self.mask_token.to(tokens.dtype), tokens)

        chunks, tg, cols = 1, grid[1], grid[1]
        chunk_padding = padding
        if self._chunk_cols:  # inputs longer than a chunk: chunks as batch rows, positions from 0 in each
            tokens, chunk_padding, chunks, cols, tg = self._chunk(tokens, padding)
        if self.pos_embed is not None:  # learned positions, cut to the input (chunks beyond pos_len)
            tokens = tokens + self.pos_embed[:, :cols].reshape(-1, self.dim).to(tokens.dtype)
        elif torch.jit.is_tracing():  # export: positions must follow the (chunk) length
            tokens = tokens + sincos_pos_embed_2d_traced(self.dim, grid[0], tokens, self._time_first)
        else:
            tokens = tokens + sincos_pos_embed_2d(self.dim, (grid[0], cols), tokens.device, tokens.dtype,
                                                  self._time_first)
        keep = mask is not None and mask.mode == "keep"
        if keep:
            if chunks > 1:
                raise ValueError(f"vit: a keep mask needs an input of at most {self._chunk_cols} patch "
                                 f"columns (encoder.pos_len / encoder.chunk), found {grid[1]}")
            idx = mask.keep_idx.to(tokens.device)
            tokens = gather_tokens(tokens, idx)
            padding = chunk_padding = torch.gather(padding, 1, idx)

        n_cls = 0
        attn_padding = chunk_padding
        if self.cls is not None:
            n_cls = 1
            tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], 1)
            attn_padding = torch.cat([chunk_padding.new_zeros(chunk_padding.shape[0], 1), chunk_padding], 1)
        if self.input_norm is not None:
            tokens = self.input_norm(tokens)

        # a traced graph with chunks keeps the mask: its last chunk is padded at other lengths
        traced_chunks = bool(self._chunk_cols) and torch.jit.is_tracing()
        # no lengths: no padding unless chunking padded the last chunk (known on the host, no sync)
        padded = traced_chunks or (chunks * cols > grid[1] if lengths is None else bool(attn_padding.any()))
        n_cat = self.concat_blocks
        y, layers, ffns = self.blocks(tokens, attn_padding if padded else None, return_layers=return_layers or n_cat > 1)
        y = self.norm(y) if n_cat == 1 else torch.cat([self.norm(h) for h in layers[-n_cat:]], -1)
        if not return_layers:
            layers, ffns = [], []
        cls = y[:, 0] if self.cls is not None else None
        if chunks > 1 or traced_chunks:
            y, layers, ffns = (self._unchunk(y[:, n_cls:], chunks, tg),
                               [self._unchunk(h[:, n_cls:], chunks, tg) for h in layers],
                               [self._unchunk(f[:, n_cls:], chunks, tg) for f in ffns])
            n_cls = 0
            if cls is not None:  # the chunks' CLS outputs, weighted by their valid columns
                w = (~chunk_padding).sum(1).to(cls.dtype).view(-1, chunks, 1)  # (B, n, 1)
                cls = (cls.view(-1, chunks, cls.shape[-1]) * w).sum(1) / w.sum(1).clamp_min(1)
        return EncoderOut(tokens=y[:, n_cls:], padding=padding,
                          layers=[h[:, n_cls:] for h in layers] if return_layers else None,
                          ffn=[f[:, n_cls:] for f in ffns] if return_layers else None,
                          cls=cls, grid=grid, keep=keep, clone=clone, frame_padding=frame_padding)

    def _chunk(self, tokens: Tensor, padding: Tensor) -> tuple[Tensor, Tensor, int, int, int]:
        """(B, Fg*Tg, D) tokens and (B, Fg*Tg) padding -> chunks of c = min(Tg, L) time columns
        (L: pos_len or chunk) as batch rows (B*n, Fg*c, D) and (B*n, Fg*c), the last chunk padded;
        and n, c, Tg (from the token count, so a traced graph follows the input length). A traced
        (exported) graph always uses c = L, so it holds for every input length."""
        B, N, D = tokens.shape
        fg, L = self.freq_grid, self._chunk_cols
        tg = N // fg
        c = L if torch.jit.is_tracing() else min(tg, L)
        n = (tg + c - 1) // c
        extra = n * c - tg
        t = F.pad(tokens.reshape(B, fg, tg, D), (0, 0, 0, extra))
        t = t.reshape(B, fg, n, c, D).transpose(1, 2).reshape(B * n, fg * c, D)
        p = F.pad(padding.reshape(B, fg, tg), (0, extra), value=True)
        p = p.reshape(B, fg, n, c).transpose(1, 2).reshape(B * n, fg * c)
        return t, p, n, c, tg

    def _unchunk(self, y: Tensor, n: int, tg: int) -> Tensor:
        """(B*n, Fg*c, D) chunk outputs -> (B, Fg*Tg, D) in token order, the padding cut off."""
        fg, D = self.freq_grid, y.shape[-1]
        c = y.shape[1] // fg
        y = y.reshape(-1, n, fg, c, D).transpose(1, 2).reshape(-1, fg, n * c, D)
        return y[:, :, :tg].reshape(-1, fg * tg, D)

    def to_frames(self, out: EncoderOut) -> tuple[Tensor, Tensor]:
        """Patch tokens regrouped per time column as M2D does, 'b (f t) d -> b t (f d)':
        (B, Tg, Fg*D) and (B,) valid columns. Needs every token (no keep mask)."""
        if out.grid is None or out.keep:
            raise ValueError("vit.to_frames needs all tokens; encode without a keep mask")
        fg, _ = out.grid
        B, _, D = out.tokens.shape
        # -1 rather than tg keeps a traced (exported) graph valid for any length
        frames = out.tokens.reshape(B, fg, -1, D).permute(0, 2, 1, 3).reshape(B, -1, fg * D)
        lengths = (~out.padding.reshape(B, fg, -1)[:, 0, :]).sum(1)
        if self.cfg.cls_frames:  # (B, Tg, D + Fg*D): the mean over frames is [CLS, mean of frames]
            frames = torch.cat([out.cls[:, None, :].expand(-1, frames.shape[1], -1).to(frames.dtype), frames], -1)
        return frames, lengths
