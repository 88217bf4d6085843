"""DeepCluster: alternate k-means on the network's own clip features and classification of the
cluster ids, adapted to a stream of audio crops.

Caron, Bojanowski, Joulin, Douze. "Deep Clustering for Unsupervised Learning of Visual Features",
ECCV 2018. Official code: github.com/facebookresearch/deepcluster (main.py: the epoch loop,
`compute_features`, the re-initialised `top_layer`; clustering.py: `preprocess_features`,
`run_kmeans` with faiss, `Kmeans.cluster`, `cluster_assign`, `arrange_clustering`; util.py:
`UnifLabelSampler`; main.sh: lr 0.05, wd 1e-5, k 10000). Where the paper and the code differ we
follow the code: an empty cluster takes the centroid of a cluster picked with probability
proportional to its size (faiss `split_clusters`, symmetric perturbation x (1 +- 1/1024)), where
the paper picks a non-empty cluster at random and perturbs it randomly.

The official loop, each epoch: features of the whole dataset through the current network (eval
mode, centre crops); PCA to 256 dimensions with whitening, L2-normalised rows; faiss k-means (20
iterations, an empty cluster replaced by a split of a big one); every image labelled by its
cluster; a new top layer Linear(fd, k) (N(0, 0.01) weights, zero bias, its own SGD without
momentum); one epoch of cross-entropy on random-resized-crop + flip views, sampled uniformly over
the clusters; the NMI between this epoch's assignment and the previous one's logged.

Here (BYOL-A's setting: log-mel crops, AudioNTT CNN, clip embedding = temporal mean + max), within
the one training loop of sslaudio, whose batches are random crops of random files drawn by step:
- Memory instead of a dataset pass: the last `memory` unaugmented log-mel crops of the training
  stream (a FIFO buffer, float16 to halve the checkpoint; filled before step 0 by `prepare` from
  the trainer's sample), the "dataset" each clustering sees. Every `reassign_every` steps (the
  epoch) `forward` re-clusters it: clip embeddings through the current encoder in eval mode,
  `kmeans.pca_whitening` (faiss PCAMatrix eigen_power -0.5) + L2 (`kmeans.whiten_l2`), then the
  project's k-means (`kmeans.fit`: k-means++ seeding, best of `kmeans_n_init`, one full-batch step;
  then `kmeans.lloyd`, the remaining `kmeans_iters` - 1 full-batch iterations with faiss's
  split of a big cluster for every empty one). faiss seeds with k random rows instead of k-means++.
- Labels of new crops: the batch's crops are not in the clustered memory, so each is labelled by
  the nearest centroid of its feature in the same PCA space, the feature computed by a frozen copy
  of the encoder taken at the clustering (`label_encoder`, eval mode), so a crop's label is fixed
  for the whole epoch as the official pseudo-labels are. Labelling with the encoder being trained
  would let it move crops between clusters to make the task trivial.
- Uniform sampling over clusters (UnifLabelSampler) becomes importance weighting: a crop of
  cluster c weighs n / (K n_c), n_c its cluster's share of the n memory crops and K the non-empty
  clusters, so the loss mean_i w_i CE_i has the expectation of the cross-entropy under the
  official sampling (each cluster equally likely, its crops equally likely); a crop whose nearest
  centroid holds no memory crop weighs 0 (the sampler never draws an empty cluster).
- The classifier (`classifier`, Linear(D, k) on the clip embedding, whose AudioNTT output already
  passed a ReLU, as the official ReLU before the top layer) is re-initialised at every clustering
  (N(0, 0.01), zero bias). The official top layer gets a fresh momentum-free SGD each epoch; the
  trainer's AdamW keeps its state, so the classifier's parameter group has beta1 = 0
  (`classifier_betas`): no momentum from the previous clusters' classifier carries over (only the
  second-moment scale does).
- Features clustered: the encoder's clip embedding (what extraction gives), not the pre-ReLU
  output of the last hidden layer the official code clusters (the encoder interface hands back
  the embedding only). Augmentation: the preset's `views` chain (BYOL-A's random resize crop: the
  official RandomResizedCrop); no flip (a time-reversed sound is another sound). No Sobel filter
  (an image-only defence against colour clusters).
- NMI between successive assignments: each crop enters the memory with the label the current
  clustering gave it in its training step; the next clustering compares its own assignment of
  those crops with these labels (`kmeans.nmi`), as the official code compares two epochs'
  assignments of the same images. That is the whole memory when reassign_every x batch_size >=
  memory (the presets); crops older than the previous clustering are left out.
- Fewer memory crops than k (a handful of crops in tests): k-means into as many clusters as crops;
  the classifier keeps k outputs.
- Several processes: each holds the memory of its own crops; a clustering gathers every process's
  embeddings and labels (`gather_fn`) and draws from rank 0's generator, so all processes hold the
  same clustering and the same re-initialised classifier (the sample `prepare` reads is the same
  in every process, so the first clustering sees each of its crops once per process).

Every random draw (k-means seeding and splits, classifier initialisation, views) comes from the
step's generator; memory, PCA, centroids, cluster weights, the frozen encoder and the statistics
are buffers or frozen parameters, so a resumed run is bit-identical to an uninterrupted one.

Logged: ce (the unweighted cross-entropy) and acc on the batch, batch_usage (entropy of its labels
over log k), and the last clustering's nmi (once there was a previous one), clusters_used,
cluster_size_cv (std / mean of the cluster sizes: the spread), cluster_max_frac, kmeans_splits,
kmeans_inertia and clusterings (how many so far).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslaudio import kmeans
from sslaudio.augment import MultiCrop
from sslaudio.config import ConfigError
from sslaudio.methods.base import Needs, ViewMethod, clip_embedding, embedding_signals
from sslaudio.methods.ema import make_teacher
from sslaudio.registry import METHODS

EMBED_BATCH = 256  # memory crops per encoder pass when re-clustering


def usage(labels: Tensor, k: int) -> Tensor:
    """kmeans.usage_entropy of (N,) labels, without the host sync of a CUDA bincount."""
    p = torch.zeros(k, device=labels.device).index_add_(0, labels, torch.ones(labels.shape, device=labels.device))
    p = p / p.sum().clamp_min(1)
    return -(p * torch.log(p.clamp_min(1e-12))).sum() / math.log(k)


def uniform_cluster_weights(counts: Tensor) -> Tensor:
    """(k,) crops per cluster -> (k,) weight n / (K n_c) of a crop of cluster c (K non-empty
    clusters; 0 for an empty one): the mean of weight x loss over crops drawn as the memory is has
    the expectation of the plain mean under uniform sampling over clusters (UnifLabelSampler)."""
    counts = counts.float()
    used = (counts > 0).sum().clamp_min(1)
    return torch.where(counts > 0, counts.sum() / (used * counts.clamp_min(1)), torch.zeros_like(counts))


@METHODS.register("deepcluster")
class DeepCluster(ViewMethod):
    @dataclass
    class Config:
        k: int = 10000  # official --nmb_cluster
        pca_dim: int = 256  # official preprocess_features(pca=256)
        memory: int = 16384  # crops re-clustered at each reassignment (the "dataset")
        reassign_every: int = 1000  # steps between clusterings (official: one epoch)
        kmeans_iters: int = 20  # official clus.niter
        kmeans_n_init: int = 1  # k-means++ seedings tried (faiss nredo 1)
        classifier_std: float = 0.01  # official top_layer.weight.normal_(0, 0.01)
        classifier_betas: tuple[float, float] = (0.0, 0.999)  # AdamW betas of the classifier's group

        def __post_init__(self):
            if self.k < 2:
                raise ConfigError(f"method.k must be >= 2, found {self.k}")
            for key in ("pca_dim", "memory", "reassign_every", "kmeans_iters", "kmeans_n_init"):
                if getattr(self, key) < 1:
                    raise ConfigError(f"method.{key} must be >= 1, found {getattr(self, key)}")
            if self.memory < 2:
                raise ConfigError(f"method.memory must be >= 2 crops, found {self.memory}")
            if not self.classifier_std > 0:
                raise ConfigError(f"method.classifier_std must be > 0, found {self.classifier_std}")
            if len(self.classifier_betas) != 2 or not all(0 <= b < 1 for b in self.classifier_betas):
                raise ConfigError(f"method.classifier_betas must be two numbers in [0, 1), "
                                  f"found {self.classifier_betas}")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=("logmel",), views=True, segments=1)

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker, crops=MultiCrop(global_crops=1))
        d = encoder.frame_dim
        self.classifier = nn.Linear(d, cfg.k)
        nn.init.normal_(self.classifier.weight, 0.0, cfg.classifier_std)
        nn.init.zeros_(self.classifier.bias)
        self.label_encoder = make_teacher(encoder)  # the encoder as of the last clustering
        self.register_buffer("memory", torch.zeros(cfg.memory, *self.spec_shape(), dtype=torch.float16))
        self.register_buffer("memory_labels", torch.full((cfg.memory,), -1, dtype=torch.long))  # see push
        self.register_buffer("memory_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("memory_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("pca_mean", torch.zeros(d))
        self.register_buffer("pca_proj", torch.zeros(d, cfg.pca_dim))
        self.register_buffer("centroids", torch.zeros(cfg.k, cfg.pca_dim))
        self.register_buffer("in_use", torch.zeros(cfg.k, dtype=torch.bool))  # centroid rows of the clustering
        self.register_buffer("cluster_counts", torch.zeros(cfg.k))  # memory crops per cluster
        self.register_buffer("cluster_weight", torch.zeros(cfg.k))
        self.register_buffer("clusterings", torch.zeros((), dtype=torch.long))
        self.register_buffer("kmeans_stats", torch.zeros(4))  # inertia, splits, nmi, crops the nmi compares
        self._pending: tuple[Tensor, Tensor] | None = None  # this step's crops and labels, for after_step
        self._facts: tuple[bool, bool] | None = None  # (clustered yet, nmi logged), read once from the buffers
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_facts", None))

    def train(self, mode: bool = True):
        super().train(mode)
        self.label_encoder.eval()  # a fixed labelling function: no dropout, running BN statistics
        return self

    def param_groups(self, weight_decay: float) -> list[dict]:
        head = set(map(id, self.classifier.parameters()))
        groups = [g for g in super().param_groups(weight_decay)]
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in head]
        betas = tuple(self.cfg.classifier_betas)
        return groups + [{"params": [self.classifier.weight], "weight_decay": weight_decay, "betas": betas},
                         {"params": [self.classifier.bias], "weight_decay": 0.0, "betas": betas}]

    def run_info(self) -> dict:
        return {"k": self.cfg.k, "pca_dim": self.cfg.pca_dim, "memory": self.cfg.memory,
                "reassign_every": self.cfg.reassign_every}

    # -- memory ---------------------------------------------------------------------------------
    @torch.no_grad()
    def push(self, x: Tensor, labels: Tensor | None = None) -> None:
        """(n, F, T) unaugmented crops into the FIFO memory, the oldest falling out, with (n,) the
        labels the current clustering gave them (-1: none). A clustering compares its assignment
        of the memory with these for the NMI, then forgets them."""
        M = self.memory.shape[0]
        x = x[-M:]
        pos = (self.memory_ptr + torch.arange(x.shape[0], device=self.memory.device)) % M  # no host sync
        self.memory[pos] = x.to(self.memory.dtype)
        self.memory_labels[pos] = -1 if labels is None else labels[-M:].to(self.memory_labels)
        self.memory_ptr.copy_((self.memory_ptr + x.shape[0]) % M)
        self.memory_filled.copy_((self.memory_filled + x.shape[0]).clamp_max(M))

    def prepare(self, audio: Tensor, sample=None) -> None:
        """Frontend statistics, then the memory filled with the trainer's sample of crops."""
        super().prepare(audio)
        batches = sample(self.cfg.memory, 64) if sample is not None else audio.split(64)
        for crops in batches:
            self.push(self.features(crops))

    # -- clustering -----------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, encoder: nn.Module, x: Tensor) -> Tensor:
        """(N, F, T) crops -> (N, D) float32 clip embeddings, encoder in eval mode, in chunks."""
        was = encoder.training
        encoder.eval()
        out = [clip_embedding(encoder, c.float()).float() for c in x.split(EMBED_BATCH)]
        encoder.train(was)
        return torch.cat(out)

    def assign(self, emb: Tensor) -> Tensor:
        """(N, D) embeddings -> (N,) nearest centroid of the last clustering, in its PCA space."""
        with torch.autocast(emb.device.type, enabled=False):
            z = kmeans.whiten_l2(emb, self.pca_mean, self.pca_proj)
            d = kmeans.sq_distances(z, self.centroids).masked_fill(~self.in_use, float("inf"))
            return d.argmin(1)

    @torch.no_grad()
    def recluster(self, generator: torch.Generator) -> None:
        """One reassignment: cluster the memory's features, refresh the frozen encoder, the cluster
        weights and statistics, and re-initialise the classifier."""
        n = int(self.memory_filled)
        if n < 2:
            raise RuntimeError("deepcluster: the memory holds fewer than 2 crops (prepare() fills it "
                               "before the first step)")
        emb = self.embed(self.encoder, self.memory[:n])  # (n, D)
        previous = self.memory_labels[:n]
        if self.gather_fn is not None:  # several processes: all of them cluster all their memories alike
            emb, previous = self.gather_fn(emb)[0], self.gather_fn(previous)[0]
            draw = torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device)
            seed = int(self.gather_fn(draw.to(emb.device))[0][0])  # rank 0's draw
            generator = torch.Generator(generator.device).manual_seed(seed)
        n = emb.shape[0]
        k = min(self.cfg.k, n)
        with torch.autocast(emb.device.type, enabled=False):
            mean, proj = kmeans.pca_whitening(emb, self.cfg.pca_dim)
            z = kmeans.whiten_l2(emb, mean, proj)
            init = kmeans.fit(z, kmeans.KMeansConfig(k=k, batch=n, iters=1, n_init=self.cfg.kmeans_n_init,
                                                     init_size=n), generator)
            fit = kmeans.lloyd(z, init.centers, self.cfg.kmeans_iters - 1, generator)
        self.pca_mean.copy_(mean)
        self.pca_proj.copy_(proj)
        self.centroids.zero_()
        self.centroids[:k] = fit.centers
        self.in_use.copy_(torch.arange(self.cfg.k, device=self.in_use.device) < k)
        self.cluster_counts.zero_()
        self.cluster_counts[:k] = fit.counts
        self.cluster_weight.copy_(uniform_cluster_weights(self.cluster_counts))
        # the previous clustering's labels of the crops it labelled (all of the memory when
        # reassign_every x batch >= memory): the official NMI between successive epochs' assignments
        seen = previous >= 0
        nmi = kmeans.nmi(previous[seen], fit.labels[seen]) if int(seen.sum()) > 1 else 0.0
        self.kmeans_stats.copy_(torch.tensor([fit.inertia, fit.splits, nmi, float(seen.sum())]))
        self.memory_labels.fill_(-1)
        self.clusterings += 1
        self._facts = (True, int(seen.sum()) > 1)
        self.label_encoder.load_state_dict(self.encoder.state_dict())
        w = self.classifier.weight
        w.copy_(torch.randn(w.shape, generator=generator, device=generator.device).to(w) * self.cfg.classifier_std)
        self.classifier.bias.zero_()

    # -- the step -------------------------------------------------------------------------------
    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        crops = self.features(batch["audio"][:, 0])  # (B, F, T) unaugmented
        if self._facts is None:  # the one host read of the buffers, after a build or a resume
            self._facts = (int(self.clusterings) > 0, float(self.kmeans_stats[3]) > 1)
        if step % self.cfg.reassign_every == 0 or not self._facts[0]:
            self.recluster(generator)
        labels = self.assign(self.embed(self.label_encoder, crops))  # (B,)
        (view,) = self.views(crops.unsqueeze(1), generator)
        emb = clip_embedding(self.encoder, view)  # (B, D)
        logits = self.classifier(emb).float()  # (B, k)
        ce = F.cross_entropy(logits, labels, reduction="none")
        loss = (self.cluster_weight[labels] * ce).mean()
        self._pending = (crops.detach(), labels)
        out = {"loss": loss, "ce": ce.detach().mean(), "acc": (logits.argmax(1) == labels).float().mean(),
               "batch_usage": usage(labels, self.cfg.k), **self.cluster_stats(), **embedding_signals(emb)}
        if self._facts[1]:
            out["nmi"] = self.kmeans_stats[2].clone()
        return out

    def cluster_stats(self) -> dict[str, Tensor]:
        """The last clustering of the memory: non-empty clusters, the spread of their sizes (std /
        mean over the clusters, 0 when all are equal) and the largest one's share; k-means facts."""
        counts, n_used = self.cluster_counts, self.in_use.sum().clamp_min(1)
        n = counts.sum().clamp_min(1)
        mean = n / n_used
        spread = ((counts - mean).square() * self.in_use).sum().div(n_used).sqrt() / mean
        return {"clusters_used": (counts > 0).sum().float(), "cluster_size_cv": spread,
                "cluster_max_frac": counts.max() / n, "kmeans_inertia": self.kmeans_stats[0].clone(),
                "kmeans_splits": self.kmeans_stats[1].clone(), "clusterings": self.clusterings.float()}

    def after_step(self, step: int, max_steps: int) -> None:
        if self._pending is not None:
            self.push(*self._pending)
            self._pending = None
