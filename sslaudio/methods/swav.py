"""SwAV: swapped prediction of online cluster assignments, on multi-crop log-mel views.

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin. "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", NeurIPS 2020. Official code: github.com/facebookresearch/swav
(main_swav.py `train`, `distributed_sinkhorn`; src/resnet50.py projection head and prototypes;
scripts/swav_*_pretrain.sh).

Audio adaptation: BYOL-A's setting (64-bin log-mel crops, AudioNTT CNN, clip embedding = temporal
mean + max) with the preset's `views` chain in place of the image augmentations, and multi-crop
in time (`augment.MultiCrop`): global views of the whole crop plus short local views, each a random
`local_frames` window of it, augmented by the same chain.

Network (src/resnet50.py): clip embedding -> projection head Linear - BN - ReLU - Linear(128)
(`proj_hidden: 0` gives the single Linear of hidden_mlp 0) -> L2-normalise -> prototypes, a
bias-free Linear to K = 3000. Views of one length go through the encoder as one batch (the official
forward groups crops by resolution); the head takes all of them at once. The prototypes' rows are
L2-normalised in place, under no_grad, at the start of every forward (the official loop does it
before each forward), so the scores are cosines.

Loss (`losses.swav_loss`): for each crop of `crops_for_assign` (the two global views), codes q =
Sinkhorn(scores / ε, 3 iterations) on its detached scores, predicted by every other crop through
softmax(scores / τ). With several processes, `gather_fn` (set by the trainer) lets Sinkhorn
normalise over every process's rows, as the official all_reduce of the sums.

Queue (official, for small batches): a (A, queue_length, 128) buffer per process (the official
--queue_length is split over the processes; ours is per process), newest rows first, holding the
L2-normalised embeddings of the assigned crops of past steps. From step `queue_start_step`
(official epoch_queue_starts) it is filled after every step; once it is full (the official test
that its last row is non-zero) its scores against the current prototypes are prepended to the
batch's for Sinkhorn, and only the batch's codes are kept. The buffer and its fill count are
checkpointed (the official code saves the queue beside the checkpoint). Filling happens in
`after_step`, so a step the trainer skips for a non-finite loss leaves it unchanged.

Prototypes frozen for `freeze_prototypes_steps` steps: the official code drops their gradients
after backward (`p.grad = None` for iteration < freeze_prototypes_niters); the trainer owns
backward here, so the scores use the detached prototype weight while step < that number, which
leaves it without gradient, and AdamW skips it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslaudio.augment import MultiCrop
from sslaudio.config import ConfigError
from sslaudio.hostint import host_int, set_host_int
from sslaudio.methods import losses
from sslaudio.methods.base import ViewMethod, embedding_signals, multicrop_embed
from sslaudio.methods.heads import mlp
from sslaudio.registry import METHODS


@METHODS.register("swav")
class SwAV(ViewMethod):
    @dataclass
    class Config:
        proj_hidden: int = 2048  # official hidden_mlp (0: a single Linear)
        proj_dim: int = 128  # official feat_dim
        prototypes: int = 3000  # official nmb_prototypes
        temperature: float = 0.1
        epsilon: float = 0.05
        sinkhorn_iterations: int = 3
        crops_for_assign: list[int] = field(default_factory=lambda: [0, 1])
        queue_length: int = 0  # official default 0 (no queue); 3840 in the batch-256 scripts
        queue_start_step: int = 0  # official epoch_queue_starts 15, in steps
        freeze_prototypes_steps: int = 0  # official freeze_prototypes_niters 313
        crops: MultiCrop = field(default_factory=lambda: MultiCrop(global_crops=2, local_crops=6, local_frames=32))

        def __post_init__(self):
            for key in ("proj_dim", "prototypes"):
                if getattr(self, key) < 1:
                    raise ConfigError(f"method.{key} must be >= 1, found {getattr(self, key)}")
            for key in ("proj_hidden", "sinkhorn_iterations", "queue_length", "queue_start_step",
                        "freeze_prototypes_steps"):
                if getattr(self, key) < 0:
                    raise ConfigError(f"method.{key} must be >= 0, found {getattr(self, key)}")
            for key in ("temperature", "epsilon"):
                if getattr(self, key) <= 0:
                    raise ConfigError(f"method.{key} must be positive, found {getattr(self, key)}")
            n = self.crops.global_crops + self.crops.local_crops
            if n < 2:
                raise ConfigError("method.crops: SwAV needs at least 2 views (global_crops + local_crops)")
            a = self.crops_for_assign
            if not a or len(set(a)) != len(a) or not all(0 <= i < n for i in a):
                raise ConfigError(f"method.crops_for_assign: {a} must be distinct view indices in [0, {n})")

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker, crops=cfg.crops)
        d = encoder.frame_dim
        dims = [d, cfg.proj_hidden, cfg.proj_dim] if cfg.proj_hidden else [d, cfg.proj_dim]
        self.projector = mlp(dims)
        self.prototypes = nn.Linear(cfg.proj_dim, cfg.prototypes, bias=False)
        A = len(cfg.crops_for_assign)
        self.register_buffer("queue", torch.zeros(A, cfg.queue_length, cfg.proj_dim))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))  # filled rows
        self._new_rows: Tensor | None = None  # this step's embeddings, enqueued by after_step

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))

    def queue_ready(self, step: int) -> bool:
        L = self.cfg.queue_length
        return L > 0 and step >= self.cfg.queue_start_step and host_int(self, "queue_count") >= L

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        self.normalize_prototypes()
        views = self.make_views(batch["audio"], generator)  # global (B, F, T), then local (B, F, L)
        V, B = len(views), views[0].shape[0]
        z = self.projector(multicrop_embed(self.encoder, views))  # (V * B, P)
        w = self.prototypes.weight
        if step < self.cfg.freeze_prototypes_steps:
            w = w.detach()
        with torch.autocast(device_type=z.device.type, enabled=False):  # cosines / ε: keep fp32
            z = F.normalize(z.float(), dim=1)
            scores = (z @ w.float().T).unflatten(0, (V, B))  # (V, B, K)
            queue_scores = self.queue.float() @ w.detach().float().T if self.queue_ready(step) else None
        c = self.cfg
        loss, terms = losses.swav_loss(scores, c.crops_for_assign, c.temperature, c.epsilon,
                                       c.sinkhorn_iterations, queue_scores, self.gather_fn)
        zv = z.detach().unflatten(0, (V, B))
        if c.queue_length and step >= c.queue_start_step:
            self._new_rows = zv[c.crops_for_assign]  # (A, B, P)
        return {"loss": loss, **terms, **embedding_signals(zv[0]),
                "queue_used": torch.tensor(float(queue_scores is not None))}

    @torch.no_grad()
    def enqueue(self, rows: Tensor) -> None:
        """(A, n, P) embeddings in front of the queue; the oldest rows fall off its end (official:
        queue[i, bs:] = queue[i, :-bs]; queue[i, :bs] = embedding)."""
        L = self.queue.shape[1]
        self.queue.copy_(torch.cat([rows.to(self.queue.dtype), self.queue], dim=1)[:, :L])
        set_host_int(self, "queue_count", min(L, host_int(self, "queue_count") + rows.shape[1]))

    def after_step(self, step: int, max_steps: int) -> None:
        if self._new_rows is not None:
            self.enqueue(self._new_rows)
            self._new_rows = None
