"""Masked Modeling Duo (M2D).

Niizumi, Takeuchi, Ohishi, Harada, Kashino. "Masked Modeling Duo: Learning Representations by
Encouraging Both Networks to Model the Input", ICASSP 2023; and "Masked Modeling Duo: Towards a
Universal Audio Pre-training Framework", IEEE/ACM TASLP 2024. Official code: github.com/nttcslab/m2d
(`patch_m2d.diff`: class M2DViT in m2d/models_mae.py, `ema_decay_sched` in train_audio.py,
m2d/engine_pretrain_m2d.py; m2d/runtime_audio.py for feature extraction).

A log-mel crop is cut into ViT patches; a random 70 % of them are masked (keep mode). The online
ViT encodes only the visible patches; a transformer predictor takes its tokens (projected to the
predictor width), puts a mask token at every masked position, adds 2-D sin-cos positions for the
whole grid, and predicts, through its blocks, a LayerNorm and a linear layer back to the encoder
width, a representation for every masked patch. The target network encodes only the masked
patches; its final-normed tokens are standardised per token (the official `norm_pix_loss`, on by
default) and the loss (official `loss_fn` 'norm_mse') is the mean over masked patches of
2 - 2 cos(prediction, target), i.e. the MSE of L2-normalised vectors (`losses.byol_loss`).

Target network as in the official M2DViT: its own transformer blocks and final norm, initialised
independently of the online ones (`target_blocks.apply(_init_weights)`), updated by EMA of the online
blocks and norm only; the patch embedding, positions and CLS token are the online network's
(the official target consumes the online `patch_embed` output under no_grad). We keep the target a
whole ViT (so it runs the shared encoder code with a complementary keep mask) and emulate the
sharing by copying the online patch embedding and CLS token into it after every update.
EMA decay rises linearly from 0.99995 to 0.99999 over the run (official `ema_decay_sched`:
step / (total_steps - 1)). Extraction uses the online encoder (runtime_audio drops `target*` and
decoder weights) with patch tokens regrouped per time step, 'b (f t) d -> b t (f d)' (`ViT.to_frames`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from sslaudio.config import ConfigError, check_range
from sslaudio.encoders.layers import (
    Block,
    gather_tokens,
    init_vit_,
    sincos_pos_embed_2d,
)
from sslaudio.masking import Mask
from sslaudio.methods import losses
from sslaudio.methods.base import Method, Needs, embedding_signals, embedding_std
from sslaudio.methods.ema import EMAConfig, ema_update, make_teacher, momentum
from sslaudio.registry import METHODS


def standardise_tokens(t: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-token standardisation over the last dim, (t - mean) / sqrt(var + eps) with the unbiased
    variance: M2D's `forward_loss` with norm_pix_loss (MAE's per-patch pixel normalisation applied
    to target features). Computed in float32."""
    t = t.float()
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True)
    return (t - mean) / (var + eps).sqrt()


class Predictor(nn.Module):
    """M2D predictor (the MAE decoder with a feature head): (B, N_vis, D) visible tokens -> (B, N, D)
    predictions at every grid position (the caller keeps the masked ones).

    Linear D -> P, mask tokens scattered into the hidden positions, fixed 2-D sin-cos positions of
    the whole grid (a CLS token, when the encoder has one, gets position zero as in MAE), pre-LN
    blocks, LayerNorm, Linear P -> D.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList([
            Block(dim, heads, int(dim * mlp_ratio), qkv_bias=True, norm_first=True, norm_eps=norm_eps)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, in_dim)
        init_vit_(self)  # MAE initialize_weights: xavier Linear, zero bias, unit LayerNorm
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, visible: Tensor, keep_idx: Tensor, grid: tuple[int, int],
                cls: Tensor | None = None) -> Tensor:
        B, _, _ = visible.shape
        n = grid[0] * grid[1]
        x = self.embed(visible)  # (B, N_vis, P)
        full = self.mask_token.to(x.dtype).expand(B, n, self.dim)
        full = full.scatter(1, keep_idx[..., None].expand(-1, -1, self.dim), x)  # (B, N, P)
        full = full + sincos_pos_embed_2d(self.dim, grid, full.device, full.dtype)
        if cls is not None:
            full = torch.cat([self.embed(cls)[:, None], full], dim=1)
        for block in self.blocks:
            full, _ = block(full)
        y = self.head(self.norm(full))
        return y[:, 1:] if cls is not None else y


@METHODS.register("m2d")
class M2D(Method):
    @dataclass
    class Config:
        pred_dim: int = 512  # official decoder_embed_dim
        pred_depth: int = 8  # official decoder_depth
        pred_heads: int = 16  # official decoder_num_heads
        pred_mlp_ratio: float = 4.0
        norm_target: bool = True  # official norm_pix_loss (default on): standardise target tokens
        loss: Literal["norm_mse", "mse"] = "norm_mse"  # official loss_fn
        ema: EMAConfig = field(default_factory=lambda: EMAConfig(start=0.99995, end=0.99999,
                                                                 schedule="linear"))

        def __post_init__(self):
            if self.pred_depth < 1 or self.pred_heads < 1:
                raise ConfigError("method.pred_depth and method.pred_heads must be >= 1")
            check_range("method.pred_dim", self.pred_dim, low=1)  # 0 passed the divisibility check
            check_range("method.pred_mlp_ratio", self.pred_mlp_ratio, low=0, low_open=True)
            if self.pred_dim % self.pred_heads or self.pred_dim % 4:
                raise ConfigError(f"method.pred_dim {self.pred_dim} must be divisible by pred_heads "
                                  f"{self.pred_heads} and by 4 (2-D sin-cos positions)")
            if self.loss not in ("norm_mse", "mse"):
                raise ConfigError(f"method.loss: {self.loss!r} is not one of ['norm_mse', 'mse']")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=("logmel",), encoder=("vit",), masker="keep", segments=1)

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        self.predictor = Predictor(encoder.dim, cfg.pred_dim, cfg.pred_depth, cfg.pred_heads,
                                   cfg.pred_mlp_ratio, encoder.cfg.norm_eps)
        self.target_encoder = make_teacher(encoder)
        # official: target blocks and norm initialised on their own, not copied from the online ones
        init_vit_(self.target_encoder.blocks)
        init_vit_(self.target_encoder.norm)

    def train(self, mode: bool = True):
        super().train(mode)
        self.target_encoder.eval()  # the official target blocks have no dropout / drop path
        return self

    def tau(self, step: int, max_steps: int) -> float:
        # official ema_decay_sched interpolates with step / (total_steps - 1)
        return momentum(self.cfg.ema, step, max(max_steps - 1, 1))

    def targets(self, x: Tensor, lengths: Tensor | None, hidden: Mask) -> Tensor:
        """Target network on the masked patches only -> (B, N_masked, D) final-normed tokens in
        grid order; `hidden` is the complementary keep mask (it lists the hidden positions ascending)."""
        with torch.no_grad():
            return self.target_encoder(x, lengths, mask=hidden).tokens

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        x = self.features(batch["audio"][:, 0])  # (B, F, T)
        B = x.shape[0]
        lengths = None  # whole crops: no padding, nothing for the encoder to check on the device
        grid = self.encoder.token_grid(x.shape)
        mask = self.masker(grid, B, None, generator)  # keep mode: equal visible count per row

        out = self.encoder(x, lengths, mask=mask)  # (B, N_vis, D): visible patches only
        pred = self.predictor(out.tokens, mask.keep_idx, grid, out.cls)  # (B, N, D)
        hidden = Mask.from_masked(~mask.masked, "keep", n_hidden=mask.keep_idx.shape[1])  # the masked patches
        pred = gather_tokens(pred, hidden.keep_idx)  # (B, N_masked, D), ascending
        target = self.targets(x, lengths, hidden)  # (B, N_masked, D)

        t = target.reshape(-1, target.shape[-1]).float()
        p = pred.reshape(-1, pred.shape[-1])
        t_std = standardise_tokens(t) if self.cfg.norm_target else t
        if self.cfg.loss == "norm_mse":
            loss = losses.byol_loss(p, t_std)  # 2 - 2 cos, mean over masked patches
        else:
            loss = ((p.float() - t_std) ** 2).mean()
        return {
            "loss": loss,
            "target_std": t.std(dim=0).mean(),  # before standardisation; 0 if targets collapse
            "pred_std": embedding_std(p),
            **embedding_signals(out.tokens.mean(dim=1)),  # online tokens pooled over the clip
            "tau": torch.tensor(self.tau(step, max_steps)),
        }

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        tau = self.tau(step, max_steps)
        ema_update(self.target_encoder.blocks, self.encoder.blocks, tau)
        ema_update(self.target_encoder.norm, self.encoder.norm, tau)
        # shared with the online network in the official code (no EMA): patch embedding, CLS token
        for t, s in zip(self.target_encoder.patch_embed.parameters(), self.encoder.patch_embed.parameters()):
            t.copy_(s)
        if self.encoder.cls is not None:
            self.target_encoder.cls.copy_(self.encoder.cls)
