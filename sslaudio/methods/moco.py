"""Momentum Contrast: MoCo v2 (a queue of momentum-encoded keys) and MoCo v3 (in-batch keys).

MoCo v2: He, Fan, Wu, Xie, Girshick. "Momentum Contrast for Unsupervised Visual Representation
Learning", CVPR 2020; Chen, Fan, Girshick, He. "Improved Baselines with Momentum Contrastive
Learning", arXiv 2003.04297, 2020. Official code: github.com/facebookresearch/moco
(moco/builder.py, main_moco.py with `--mlp --moco-t 0.2 --aug-plus --cos`).

MoCo v3: Chen, Xie, He. "An Empirical Study of Training Self-Supervised Vision Transformers",
ICCV 2021. Official code: github.com/facebookresearch/moco-v3 (moco/builder.py, main_moco.py
`adjust_moco_momentum`, CONFIG.md).

Audio adaptation: BYOL-A's setting (64-bin log-mel crops, AudioNTT CNN, clip embedding = temporal
mean + max = the "encoder" whose output the MLP heads take) with the preset's `views` chain in
place of the image augmentations (`augment.ViewSampler`: with data.segments 1 the one crop is
augmented twice, with 2 each crop of the file is augmented once).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from sslaudio.config import ConfigError
from sslaudio.methods import losses
from sslaudio.methods.base import ViewMethod, clip_embedding, embedding_std
from sslaudio.methods.ema import EMAConfig, ema_update, make_teacher, momentum
from sslaudio.methods.heads import mlp
from sslaudio.registry import METHODS


def _check_temperature(t: float) -> None:
    if t <= 0:
        raise ConfigError(f"method.temperature must be positive, found {t}")


@METHODS.register("moco-v2")
class MoCoV2(ViewMethod):
    """MoCo v2: query encoder + MLP head; key encoder = its momentum copy; a FIFO queue of keys.

    Head (`--mlp`): Linear(d, d) - ReLU - Linear(d, 128), no BN, as the official brute-force
    replacement of the ResNet fc. Loss: InfoNCE of each query against its key (the other view,
    through the key encoder) and the K queued keys, temperature 0.2 (`losses.info_nce_queue`).
    One direction, as the official code (`symmetric: true` averages both directions and enqueues
    both views' keys). Key encoder: momentum 0.999, constant. The official code updates it at the
    start of each forward; `after_step` does the same update between the two steps.

    Queue: a (K, D) buffer of L2-normalised keys (the official one is (D, K)), initialised with
    normalised Gaussian rows, and a pointer buffer; both live in the checkpoint, so a resumed run
    contrasts against the same keys. The official code dequeues-and-enqueues inside forward
    after computing the logits; here forward keeps this step's keys and `after_step` writes them
    at the pointer (the same keys, the same order, but never for a step the trainer skipped for
    a non-finite loss). A key batch need not divide K: it wraps around.

    Shuffle-BN: the official code shuffles the key batch across GPUs so that the key encoder's
    BN statistics do not come from the same sub-batch as the queries'. In one process the key
    encoder's BN sees the whole key batch and there is nothing to shuffle (a permutation does
    not change the batch statistics). Set `gather_fn` (losses.GatherFn, no gradient needed) and
    the keys of every process are enqueued, as the official `concat_all_gather`.
    """

    @dataclass
    class Config:
        proj_hidden: int = 0  # 0: the encoder width (official: dim_mlp = fc input width)
        proj_dim: int = 128
        queue_size: int = 65536
        temperature: float = 0.2  # v2 (with the MLP head); v1 used 0.07
        ema: EMAConfig = field(default_factory=lambda: EMAConfig(start=0.999))  # constant
        symmetric: bool = False  # official v2: one direction

        def __post_init__(self):
            if self.proj_hidden < 0 or self.proj_dim < 1 or self.queue_size < 1:
                raise ConfigError("method: moco-v2 needs proj_hidden >= 0, proj_dim >= 1, queue_size >= 1")
            _check_temperature(self.temperature)

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        d = encoder.frame_dim
        self.projector = mlp([d, cfg.proj_hidden or d, cfg.proj_dim], norm="none")
        self.key_encoder = make_teacher(encoder)
        self.key_projector = make_teacher(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._new_keys: Tensor | None = None  # this step's keys, enqueued by after_step

    def _keys(self, v: Tensor) -> Tensor:
        with torch.no_grad():
            k = self.key_projector(clip_embedding(self.key_encoder, v))
            return F.normalize(k.float(), dim=1)  # (B, P)

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        v1, v2 = self.make_views(batch["audio"], generator)  # (B, F, T) each
        q1 = self.projector(clip_embedding(self.encoder, v1))  # (B, P) queries
        k2 = self._keys(v2)
        loss, terms = losses.info_nce_queue(q1, k2, self.queue, self.cfg.temperature)
        keys, emb = k2, q1
        if self.cfg.symmetric:
            q2 = self.projector(clip_embedding(self.encoder, v2))
            k1 = self._keys(v1)
            loss2, terms2 = losses.info_nce_queue(q2, k1, self.queue, self.cfg.temperature)
            loss = (loss + loss2) / 2
            terms = {k: (terms[k] + terms2[k]) / 2 for k in terms}
            keys = torch.cat([k2, k1])
        if self.gather_fn is not None:
            keys, _ = self.gather_fn(keys)
        self._new_keys = keys.detach()
        return {"loss": loss, **terms, "emb_std": embedding_std(emb)}

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write (N, D) keys at the pointer (FIFO: they replace the oldest), advance it mod K."""
        K = self.queue.shape[0]
        keys = keys[-K:]  # more keys than slots: only the newest K survive
        n = keys.shape[0]
        ptr = int(self.queue_ptr)
        idx = (ptr + torch.arange(n, device=self.queue.device)) % K
        self.queue[idx] = F.normalize(keys.float(), dim=1).to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % K)

    def after_step(self, step: int, max_steps: int) -> None:
        tau = momentum(self.cfg.ema, step, max_steps)
        ema_update(self.key_encoder, self.encoder, tau)
        ema_update(self.key_projector, self.projector, tau)
        if self._new_keys is not None:
            self.enqueue(self._new_keys)
            self._new_keys = None


@METHODS.register("moco-v3")
class MoCoV3(ViewMethod):
    """MoCo v3: base encoder + projector + predictor; momentum encoder + projector; no queue.

    Heads (paper, sec. 4 and appendix): a 3-layer projector and a 2-layer predictor, hidden 4096,
    output 256, every layer Linear + BN (+ ReLU except the last); the output BN has no affine
    parameters (moco/builder.py `_build_mlp`, "we further removed gamma in BN"). The official
    code builds this for ViT; its ResNet variant uses a 2-layer projector and a predictor
    without the output BN (`proj_layers: 2, pred_last_bn: false`).

    Loss: `moco_v3_loss(q1, k2) + moco_v3_loss(q2, k1)` (CE over the in-batch keys times 2 tau),
    each view through the networks separately, as the official forward. Temperature: the code
    uses 1.0 for ResNet-50 and 0.2 for ViT; our encoder is a CNN, and the presets say which they
    take. Momentum: 0.99 -> 1 with the half-cosine of `adjust_moco_momentum`
    (m = 1 - (1 - m0) (1 + cos(pi t / T)) / 2), which is EMAConfig's cosine schedule. The
    official loop sets m for iteration t and updates at the start of that iteration's forward;
    `after_step(t)` makes the same update with m for iteration t + 1.

    Multi-process: set `gather_fn` (losses.GatherFn; keys carry no gradient, so a plain
    all_gather will do) and each query is contrasted with the keys of every process.
    """

    @dataclass
    class Config:
        proj_layers: int = 3
        proj_hidden: int = 4096
        proj_dim: int = 256
        pred_hidden: int = 4096
        pred_last_bn: bool = True
        temperature: float = 1.0  # official default (ResNet-50); 0.2 for ViT
        ema: EMAConfig = field(default_factory=lambda: EMAConfig(start=0.99, end=1.0, schedule="cosine"))

        def __post_init__(self):
            if min(self.proj_layers, self.proj_hidden, self.proj_dim, self.pred_hidden) < 1:
                raise ConfigError("method: moco-v3 needs positive proj_layers, proj_hidden, proj_dim, pred_hidden")
            _check_temperature(self.temperature)

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        d = encoder.frame_dim
        self.projector = mlp([d] + [cfg.proj_hidden] * (cfg.proj_layers - 1) + [cfg.proj_dim],
                             last_norm="bn", bias_last=False)
        self.predictor = mlp([cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim],
                             last_norm="bn" if cfg.pred_last_bn else None, bias_last=False)
        self.momentum_encoder = make_teacher(encoder)
        self.momentum_projector = make_teacher(self.projector)

    def _online(self, v: Tensor) -> tuple[Tensor, Tensor]:
        z = self.projector(clip_embedding(self.encoder, v))  # (B, P)
        return z, self.predictor(z)

    def _momentum(self, v: Tensor) -> Tensor:
        with torch.no_grad():
            return self.momentum_projector(clip_embedding(self.momentum_encoder, v))

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        v1, v2 = self.make_views(batch["audio"], generator)  # (B, F, T) each
        z1, q1 = self._online(v1)
        _, q2 = self._online(v2)
        k1, k2 = self._momentum(v1), self._momentum(v2)
        a = losses.moco_v3_loss(q1, k2, self.cfg.temperature, self.gather_fn)
        b = losses.moco_v3_loss(q2, k1, self.cfg.temperature, self.gather_fn)
        terms = {k: (a.terms[k] + b.terms[k]) / 2 for k in a.terms}
        return {"loss": a.loss + b.loss, **terms, "emb_std": embedding_std(z1)}

    def after_step(self, step: int, max_steps: int) -> None:
        tau = momentum(self.cfg.ema, step + 1, max_steps)
        ema_update(self.momentum_encoder, self.encoder, tau)
        ema_update(self.momentum_projector, self.projector, tau)
