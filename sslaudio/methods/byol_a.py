"""BYOL for Audio (BYOL-A).

Niizumi, Takeuchi, Ohishi, Harada, Kashino. "BYOL for Audio: Self-Supervised Learning for
General-Purpose Audio Representation", IJCNN 2021; and "BYOL for Audio: Exploring Pre-trained
General-purpose Audio Representations", IEEE/ACM TASLP 2023 (v2). Official code:
github.com/nttcslab/byol-a (train.py, v2/train_v2.py, byol_pytorch.diff).

One log-mel crop per file, pre-normalised by the frontend's dataset statistics, is augmented
twice by the preset's `views` chain (mixup -> random resize crop [-> random linear fader in v2]).
Online = encoder + projector + predictor, target = EMA(encoder + projector) with tau 0.99 held
constant (the official code uses byol-pytorch's fixed moving_average_decay). The loss is the sum of
the two directions of 2 - 2 cos.

Both official training scripts (train.py and v2/train_v2.py, `BYOLALearner.training_step`)
concatenate the two augmented batches, standardise them with one mean and std over all 2B views
(`post_norm = NormalizeBatch()`, axis [0, 2, 3] of (2B, 1, F, T)), split them again and call
`BYOL.forward(image_one, image_two)`, which (byol_pytorch.diff) runs `online_encoder(image_one)`,
`online_encoder(image_two)`, then the target encoder on each view separately: each view is its own
forward pass, so BatchNorm statistics are those of one view's B rows. `post_norm` (default on) is
that batch standardisation, for v1 as for v2.
The views come from the view-method base: one crop, the `views` chain applied twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sslaudio.augment import normalize_batch
from sslaudio.methods import losses
from sslaudio.methods.base import Needs, ViewMethod, clip_embedding, embedding_signals, embedding_std
from sslaudio.methods.ema import EMAConfig, ema_update, make_teacher, momentum
from sslaudio.methods.heads import mlp
from sslaudio.registry import METHODS


@METHODS.register("byol-a")
class BYOLA(ViewMethod):
    @dataclass
    class Config:
        proj_hidden: int = 4096
        proj_dim: int = 256
        ema: EMAConfig = field(default_factory=EMAConfig)  # 0.99, constant
        post_norm: bool = True  # standardise the 2B augmented views together (official NormalizeBatch)

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=("logmel",), views=True, segments=1)

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        self._register_load_state_dict_pre_hook(_rename_old_view_keys)
        self.projector = mlp([encoder.frame_dim, cfg.proj_hidden, cfg.proj_dim])
        self.predictor = mlp([cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim])
        self.target_encoder = make_teacher(encoder)
        self.target_projector = make_teacher(self.projector)

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        B = batch["audio"].shape[0]
        with torch.no_grad():
            views = torch.cat(self.make_views(batch["audio"], generator))  # (2B, F, T)
            if self.cfg.post_norm:
                views = normalize_batch(views)  # one mean / std over both views, as NormalizeBatch
        return self.symmetric_step(views[:B], views[B:])

    def symmetric_step(self, v1: Tensor, v2: Tensor) -> dict[str, Tensor]:
        """The BYOL loss of two views, each predicting the target's projection of the other. Each
        view has its own pass through online and target networks (BatchNorm statistics per view)."""
        z1 = self.projector(clip_embedding(self.encoder, v1))  # (B, P)
        z2 = self.projector(clip_embedding(self.encoder, v2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.target_projector(clip_embedding(self.target_encoder, v1))
            t2 = self.target_projector(clip_embedding(self.target_encoder, v2))
        loss = losses.byol_loss(p1, t2) + losses.byol_loss(p2, t1)
        return {"loss": loss, **embedding_signals(z1), "target_std": embedding_std(t1)}

    def after_step(self, step: int, max_steps: int) -> None:
        tau = momentum(self.cfg.ema, step, max_steps)
        ema_update(self.target_encoder, self.encoder, tau)
        ema_update(self.target_projector, self.projector, tau)


def _rename_old_view_keys(state_dict, prefix, *args) -> None:
    """Checkpoints of sslaudio <= 0.1.0 kept BYOL-A's view chain (its mixup memory) at
    `views.augs.*`; the view-method base holds it at `views.global_chains.0.augs.*`."""
    old, new = prefix + "views.augs.", prefix + "views.global_chains.0.augs."
    for k in [k for k in state_dict if k.startswith(old)]:
        state_dict[new + k[len(old):]] = state_dict.pop(k)
