"""SimCLR: contrast two augmented views of each clip against the other clips of the batch.

Chen, Kornblith, Norouzi, Hinton. "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020; Chen, Kornblith, Swersky, Norouzi, Hinton. "Big Self-Supervised
Models are Strong Semi-Supervised Learners", NeurIPS 2020 (SimCLR v2). Official code:
github.com/google-research/simclr (tf2/model.py `ProjectionHead`, tf2/objective.py
`add_contrastive_loss`, tf2/run.py flags).

Audio adaptation: BYOL-A's setting (64-bin log-mel crops, AudioNTT CNN, clip embedding = temporal
mean + max) with the preset's `views` chain in place of the image crops and colour distortion
(`augment.ViewSampler`: with data.segments 1 the one crop is augmented twice, with 2 each crop of
the file is augmented once).
Both views go through the encoder as one concatenated batch, as the official model does
(`tf.concat(features_list, 0)`), so BatchNorm sees all 2N views together. The loss is NT-Xent
(`losses.nt_xent`): every view must find its partner among the other 2N - 1, the 2N - 2 other
views being the negatives.

Projection head: SimCLR v2's 3 layers by default (`proj_layers: 2` gives v1), the hidden width
equal to the encoder width and a 128-d output, as tf2/run.py (`num_proj_layers 3`, `proj_out_dim
128`, hidden = input width). Every layer is Linear + BN (+ ReLU except the last). The official
last BN keeps its scale but drops its centre; ours (heads.mlp `last_norm="bn"`) drops both, as
MoCo v3 does ("for simplicity, we further removed gamma in BN"). The hidden Linear layers keep
a bias in front of their BN, which the BN cancels.

Multi-process training: set `method.gather_fn` (see `losses.GatherFn`) to a differentiable
all-gather and each local view is contrasted with the views of every process, as the official
TPU code does (`cross_replica_sum`). It is None for a single process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sslaudio.config import ConfigError
from sslaudio.methods import losses
from sslaudio.methods.base import ViewMethod, clip_embedding, embedding_signals
from sslaudio.methods.heads import mlp
from sslaudio.registry import METHODS


@METHODS.register("simclr")
class SimCLR(ViewMethod):
    @dataclass
    class Config:
        proj_layers: int = 3  # SimCLR v2 (tf2/run.py num_proj_layers); v1 used 2
        proj_hidden: int = 0  # 0: the encoder width, as the official head
        proj_dim: int = 128
        temperature: float = 0.1  # ImageNet, batch 4096; the paper's CIFAR-10 runs use 0.5

        def __post_init__(self):
            if self.proj_layers < 1 or self.proj_hidden < 0 or self.proj_dim < 1:
                raise ConfigError("method: simclr needs proj_layers >= 1, proj_hidden >= 0, proj_dim >= 1")
            if self.temperature <= 0:
                raise ConfigError(f"method.temperature must be positive, found {self.temperature}")

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        d = encoder.frame_dim
        hidden = cfg.proj_hidden or d
        self.projector = mlp([d] + [hidden] * (cfg.proj_layers - 1) + [cfg.proj_dim], last_norm="bn")

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        v1, v2 = self.make_views(batch["audio"], generator)  # (B, F, T) each
        B = v1.shape[0]
        z = self.projector(clip_embedding(self.encoder, torch.cat([v1, v2])))  # (2B, P)
        loss, terms = losses.nt_xent(z[:B], z[B:], self.cfg.temperature, self.gather_fn)
        return {"loss": loss, **terms, **embedding_signals(z[:B])}
