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
from sslaudio.hostint import host_int, set_host_int
from sslaudio.methods import losses
from sslaudio.methods.base import ViewMethod, clip_embedding, embedding_signals
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

    Shuffle-BN (`shuffle_bn: true`, the default; official moco/builder.py `_batch_shuffle_ddp` /
    `_batch_unshuffle_ddp`, MoCo paper sec. 3.3): with BN in the encoder, a query and its positive
    key computed in the same batch share that batch's statistics, a signature the negatives (keys
    of older batches, in the queue) lack, so the pretext task can be solved by "cheating" on it.
    The key batch is therefore encoded in sub-batches that are a random permutation of it:
    - several processes (`gather_fn` set): the key views of every process are gathered, permuted by
      a permutation every process draws identically (seeded by rank 0's draw from its step
      generator, the seeds gathered with the views' gather instead of the official broadcast),
      each process encodes its slice of the permuted batch, the keys are gathered back and
      unshuffled (argsort of the permutation); each process keeps its own rows for the loss and
      the gathered keys of every process go to the queue, as the official `concat_all_gather`.
      Each process's slice is one BN group (`shuffle_bn_splits` is not used there).
    - one process: the split-batch equivalent. The key batch is permuted with the step's
      generator, split into `shuffle_bn_splits` groups (S, default 2 in the presets;
      torch.tensor_split, so sizes differ by at most one), each group goes through the key
      encoder + head on its own (its own BN statistics), and the keys are put back in batch
      order. S = 1 (or `shuffle_bn: false`, the previous behaviour) encodes the key batch
      whole; the queries are always encoded as one batch, as on each official GPU.
    The head has no BN, so only the encoder's BN layers see the grouping.
    """

    @dataclass
    class Config:
        proj_hidden: int = 0  # 0: the encoder width (official: dim_mlp = fc input width)
        proj_dim: int = 128
        queue_size: int = 65536
        temperature: float = 0.2  # v2 (with the MLP head); v1 used 0.07
        ema: EMAConfig = field(default_factory=lambda: EMAConfig(start=0.999))  # constant
        symmetric: bool = False  # official v2: one direction
        shuffle_bn: bool = True  # official _batch_shuffle_ddp; false: the key batch as one BN batch
        shuffle_bn_splits: int = 2  # one process: BN groups of the shuffled key batch (1 = off)

        def __post_init__(self):
            if self.proj_hidden < 0 or self.proj_dim < 1 or self.queue_size < 1:
                raise ConfigError("method: moco-v2 needs proj_hidden >= 0, proj_dim >= 1, queue_size >= 1")
            if self.shuffle_bn_splits < 1:
                raise ConfigError(f"method.shuffle_bn_splits must be >= 1, found {self.shuffle_bn_splits}")
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

    def _encode_keys(self, v: Tensor) -> Tensor:
        """(n, F, T) key views -> (n, P) L2-normalised keys, the rows as one BN batch."""
        k = self.key_projector(clip_embedding(self.key_encoder, v))
        return F.normalize(k.float(), dim=1)

    @torch.no_grad()
    def _keys(self, v: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(B, F, T) key views -> this process's keys (B, P) in batch order, and the keys of every
        process for the queue (the same tensor in one process)."""
        if self.gather_fn is not None:
            if self.cfg.shuffle_bn:
                return self._keys_shuffled_across_processes(v, generator)
            k = self._encode_keys(v)
            return k, self.gather_fn(k)[0]
        if self.cfg.shuffle_bn and self.cfg.shuffle_bn_splits > 1:
            k = self._keys_split_batch(v, generator)
        else:
            k = self._encode_keys(v)
        return k, k

    def _keys_split_batch(self, v: Tensor, generator: torch.Generator) -> Tensor:
        """One process: permute the key batch, encode S groups separately, unshuffle."""
        B, S = v.shape[0], self.cfg.shuffle_bn_splits
        if B < S:
            raise ValueError(f"moco-v2 shuffle-BN: a key batch of {B} cannot make {S} groups "
                             "(method.shuffle_bn_splits)")
        perm = torch.randperm(B, generator=generator, device=generator.device).to(v.device)
        k = torch.cat([self._encode_keys(v[idx]) for idx in perm.tensor_split(S)])
        return k[torch.argsort(perm)]  # row perm[j] of the batch was encoded at j

    def _keys_shuffled_across_processes(self, v: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Several processes: the official batch shuffle / unshuffle across processes."""
        B = v.shape[0]
        v_all, offset = self.gather_fn(v)  # (W * B, F, T), every process's key views
        N = v_all.shape[0]
        W, rank = N // B, offset // B
        # one permutation on every process without a broadcast: rank 0's draw, gathered
        draw = torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device)
        seeds, _ = self.gather_fn(draw.to(v.device))
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(int(seeds[0]))).to(v.device)
        k_mine = self._encode_keys(v_all[perm.view(W, B)[rank]])  # this process's shuffled slice
        k_all, _ = self.gather_fn(k_mine)  # (W * B, P) in permuted order
        k_all = k_all[torch.argsort(perm)]  # back in global batch order
        return k_all[offset:offset + B], k_all

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        v1, v2 = self.make_views(batch["audio"], generator)  # (B, F, T) each
        q1 = self.projector(clip_embedding(self.encoder, v1))  # (B, P) queries
        k2, keys = self._keys(v2, generator)
        loss, terms = losses.info_nce_queue(q1, k2, self.queue, self.cfg.temperature)
        emb = q1
        if self.cfg.symmetric:
            q2 = self.projector(clip_embedding(self.encoder, v2))
            k1, keys1 = self._keys(v1, generator)
            loss2, terms2 = losses.info_nce_queue(q2, k1, self.queue, self.cfg.temperature)
            loss = (loss + loss2) / 2
            terms = {k: (terms[k] + terms2[k]) / 2 for k in terms}
            keys = torch.cat([keys, keys1])
        self._new_keys = keys.detach()
        return {"loss": loss, **terms, **embedding_signals(emb)}

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write (N, D) keys at the pointer (FIFO: they replace the oldest), advance it mod K."""
        K = self.queue.shape[0]
        keys = keys[-K:]  # more keys than slots: only the newest K survive
        n = keys.shape[0]
        ptr = host_int(self, "queue_ptr")
        idx = (ptr + torch.arange(n, device=self.queue.device)) % K
        self.queue[idx] = F.normalize(keys.float(), dim=1).to(self.queue.dtype)
        set_host_int(self, "queue_ptr", (ptr + n) % K)

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

    Heads: the official ResNet variant by default (moco/builder.py `MoCo_ResNet`, the CONFIG.md
    ResNet-50 recipes), since our encoder is a CNN: a 2-layer projector Linear - BN - ReLU - Linear
    - BN and a 2-layer predictor Linear - BN - ReLU - Linear without the output BN (`_build_mlp(2,
    dim, mlp_dim, dim, False)`), hidden 4096, output 256; the output BN of the projector has no
    affine parameters ("we further removed gamma in BN"). The official Linear layers have no bias;
    here the output ones have none and the hidden ones keep theirs (heads.mlp), which the BN after
    them cancels. `MoCo_ViT` (the paper's ViT heads) is `proj_layers: 3, pred_last_bn: true` with
    temperature 0.2 (CONFIG.md's ViT recipes `--moco-t=.2`); mixing the two variants is not an
    official setting.

    Loss: `moco_v3_loss(q1, k2) + moco_v3_loss(q2, k1)` (CE over the in-batch keys times 2 tau),
    each view through the networks separately, as the official forward. Temperature: 1.0, the
    main_moco.py default the ResNet-50 recipes keep (0.2 for ViT). Momentum: 0.99 -> 1 with the
    half-cosine of `adjust_moco_momentum`
    (m = 1 - (1 - m0) (1 + cos(pi t / T)) / 2), which is EMAConfig's cosine schedule. The
    official loop sets m for iteration t and updates at the start of that iteration's forward;
    `after_step(t)` makes the same update with m for iteration t + 1.

    Multi-process: set `gather_fn` (losses.GatherFn; keys carry no gradient, so a plain
    all_gather will do) and each query is contrasted with the keys of every process.
    """

    @dataclass
    class Config:
        proj_layers: int = 2  # MoCo_ResNet; MoCo_ViT: 3
        proj_hidden: int = 4096
        proj_dim: int = 256
        pred_hidden: int = 4096
        pred_last_bn: bool = False  # MoCo_ResNet; MoCo_ViT: true
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
        return {"loss": a.loss + b.loss, **terms, **embedding_signals(z1)}

    def after_step(self, step: int, max_steps: int) -> None:
        tau = momentum(self.cfg.ema, step + 1, max_steps)
        ema_update(self.momentum_encoder, self.encoder, tau)
        ema_update(self.momentum_projector, self.projector, tau)
