"""Barlow Twins and VICReg on audio: two views, a wide projector, a redundancy-reduction loss.

Barlow Twins: Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", ICML 2021; official code github.com/facebookresearch/barlowtwins (main.py).
Audio: Anton et al., "Audio Barlow Twins", ICASSP 2023 (github.com/jonahanton/SSL_audio).
VICReg: Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022; official code github.com/facebookresearch/vicreg
(main_vicreg.py).

Several processes: both official codes use SyncBatchNorm and compute the loss on the global batch
(Barlow Twins all-reduces the cross-correlation, VICReg gathers the embeddings); here `gather_fn`
gathers the projections and the trainer converts BatchNorm to SyncBatchNorm on CUDA.

Both are symmetric (no predictor, no stop-gradient, no EMA): each view goes through the same
encoder and projector in its own forward pass, as both official `forward(y1, y2)` do. Views come
from `sslaudio.augment.ViewSampler` (data.segments 1: one crop augmented twice; 2: two crops).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sslaudio.config import ConfigError
from sslaudio.methods import losses
from sslaudio.methods.base import ViewMethod, clip_embedding, embedding_signals
from sslaudio.methods.heads import mlp
from sslaudio.registry import METHODS


class _TwoViewProjector(ViewMethod):
    """Shared body: views -> encoder -> pooled clip embedding -> projector (expander).

    Projector (both official codes): Linear - BN - ReLU for every hidden width, then a final
    Linear without bias. Barlow Twins' hidden Linears have no bias, VICReg's do; a bias followed
    by BatchNorm is cancelled exactly, so one head builder serves both.
    """

    @dataclass
    class Config:
        projector: list[int] = field(default_factory=lambda: [8192, 8192, 8192])

        def __post_init__(self):
            if not self.projector or min(self.projector) < 1:
                raise ConfigError("method.projector: a non-empty list of positive widths")

    def __init__(self, cfg, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        self.projector = mlp([encoder.frame_dim, *cfg.projector], bias_last=False)

    def project(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(B, P) projections of the two views; under torchrun, every process's rows (the official
        code's all-reduced cross-correlation / FullGatherLayer), so the batch statistics are global."""
        v1, v2 = self.make_views(batch["audio"], generator)
        z1 = self.projector(clip_embedding(self.encoder, v1))
        z2 = self.projector(clip_embedding(self.encoder, v2))
        if self.gather_fn is not None:
            z1, z2 = self.gather_fn(z1)[0], self.gather_fn(z2)[0]
        return z1, z2


@METHODS.register("barlow-twins")
class BarlowTwins(_TwoViewProjector):
    """Cross-correlation of the batch-standardised projections pushed to the identity:
    sum_i (1 - c_ii)^2 + lambd sum_{i != j} c_ij^2 (losses.barlow_twins_loss, the official
    non-affine BN + c / N). lambd: 0.0051 is the official main.py default (the paper says 5e-3;
    Audio Barlow Twins uses 5e-3). Logs the unweighted on_diag and off_diag terms."""

    @dataclass
    class Config(_TwoViewProjector.Config):
        lambd: float = 0.0051

        def __post_init__(self):
            super().__post_init__()
            if self.lambd < 0:
                raise ConfigError("method.lambd must be >= 0")

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        z1, z2 = self.project(batch, generator)
        loss, terms = losses.barlow_twins_loss(z1, z2, self.cfg.lambd)
        return {"loss": loss, **terms, **embedding_signals(z1)}


@METHODS.register("vicreg")
class VICReg(_TwoViewProjector):
    """sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance of the expander
    outputs (losses.vicreg_loss; official defaults 25 / 25 / 1). Logs the three unweighted terms."""

    @dataclass
    class Config(_TwoViewProjector.Config):
        sim_coeff: float = 25.0
        std_coeff: float = 25.0
        cov_coeff: float = 1.0

        def __post_init__(self):
            super().__post_init__()
            if min(self.sim_coeff, self.std_coeff, self.cov_coeff) < 0:
                raise ConfigError("method: sim_coeff, std_coeff and cov_coeff must be >= 0")

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        z1, z2 = self.project(batch, generator)
        c = self.cfg
        loss, terms = losses.vicreg_loss(z1, z2, c.sim_coeff, c.std_coeff, c.cov_coeff)
        return {"loss": loss, **terms, **embedding_signals(z1)}
