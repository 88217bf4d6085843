"""BYOL and SimSiam on audio: two views of a clip, an online predictor, no negatives.

BYOL: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020; official code github.com/deepmind/deepmind-research/tree/master/byol
(byol_experiment.py, utils/schedules.py `target_ema`, configs/byol.py).
SimSiam: Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021; official code
github.com/facebookresearch/simsiam (simsiam/builder.py, main_simsiam.py).

Both take their views from `sslaudio.augment.ViewSampler`: with data.segments 1 the one crop is
augmented twice (BYOL-A style), with data.segments 2 each view is its own crop of the recording.
The encoder's pooled clip embedding feeds the heads; each view goes through the networks in its
own forward pass, as both official codes do (so BatchNorm statistics are per view).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sslaudio.config import ConfigError
from sslaudio.methods import losses
from sslaudio.methods.base import Needs, ViewMethod, clip_embedding, embedding_signals, embedding_std
from sslaudio.methods.byol_a import BYOLA
from sslaudio.methods.ema import EMAConfig
from sslaudio.methods.heads import mlp
from sslaudio.registry import METHODS


@METHODS.register("byol")
class BYOL(BYOLA):
    """BYOL: online encoder + projector + predictor regresses the target's projection of the other
    view; target = EMA(encoder + projector) with tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2.

    Loss: the paper's L + L~ (byol_loss(p1, sg(t2)) + byol_loss(p2, sg(t1))), each 2 - 2 cos
    averaged over the batch, as the official `regression_loss` terms summed. Heads: the paper's
    MLP Linear(4096) - BN - ReLU - Linear(256) for both projector and predictor.
    The heads, target networks and the EMA update are BYOL-A's (`byol_a.BYOLA`); BYOL differs in
    the views (ViewSampler: two crops or two augmentations) and the cosine EMA schedule.
    """

    @dataclass
    class Config:
        proj_hidden: int = 4096
        proj_dim: int = 256
        # tau_base 0.996 for 1000 epochs in the paper; 0.99 for the shorter 300-epoch schedule
        ema: EMAConfig = field(default_factory=lambda: EMAConfig(start=0.99, end=1.0, schedule="cosine"))

    @classmethod
    def needs(cls, cfg) -> Needs:  # unlike BYOL-A: two crops allowed, and no chain needed with them
        return Needs(frontend=("logmel",))

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        return self.symmetric_step(*self.make_views(batch["audio"], generator))  # (B, F, T) each


@METHODS.register("simsiam")
class SimSiam(ViewMethod):
    """SimSiam: L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with D the negative cosine; no EMA.

    Projector (official builder): 3 layers, Linear - BN - ReLU twice at the encoder's width, then
    Linear(dim) - BN(affine=False); its last Linear's bias is frozen in the official code and is
    dropped here (the BN removes it). The hidden Linears here keep a bias, which the BN that
    follows cancels exactly (its gradient is zero). Predictor: bottleneck Linear(pred_hidden) - BN
    - ReLU - Linear(dim). `fix_pred_lr` (official --fix-pred-lr, used in the README's command)
    keeps the predictor at the base learning rate (official `fix_lr` groups): its param groups
    carry the Method interface's `constant_lr: True`.
    """

    @dataclass
    class Config:
        proj_hidden: int = 0  # 0: the encoder's clip width (official: prev_dim, 2048 for ResNet-50)
        proj_dim: int = 2048
        pred_hidden: int = 512
        fix_pred_lr: bool = False  # official argparse default; its README pretrains with it on

        def __post_init__(self):
            if self.proj_hidden < 0 or self.proj_dim < 1 or self.pred_hidden < 1:
                raise ConfigError("method: proj_dim and pred_hidden must be positive, proj_hidden >= 0")

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        d = encoder.frame_dim
        h = cfg.proj_hidden or d
        self.projector = mlp([d, h, h, cfg.proj_dim], bias_last=False, last_norm="bn")
        self.predictor = mlp([cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim])

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        v1, v2 = self.make_views(batch["audio"], generator)
        z1 = self.projector(clip_embedding(self.encoder, v1))  # (B, proj_dim)
        z2 = self.projector(clip_embedding(self.encoder, v2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        # negative_cosine detaches its second argument: the stop-gradient on z
        loss = 0.5 * losses.negative_cosine(p1, z2) + 0.5 * losses.negative_cosine(p2, z1)
        return {"loss": loss, **embedding_signals(z1), "pred_std": embedding_std(p1)}

    def param_groups(self, weight_decay: float) -> list[dict]:
        groups = super().param_groups(weight_decay)
        if not self.cfg.fix_pred_lr:
            return groups
        pred = {id(p) for p in self.predictor.parameters()}
        out = []
        for g in groups:
            for fixed in (False, True):
                params = [p for p in g["params"] if (id(p) in pred) == fixed]
                if params:
                    out.append({**g, "params": params, "constant_lr": fixed})
        return out
