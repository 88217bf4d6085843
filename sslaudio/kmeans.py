"""Streaming mini-batch k-means in torch: the clustering component of HuBERT's targets (and of
DeepCluster).

As fairseq's `examples/hubert/simple_kmeans/learn_kmeans.py` (scikit-learn MiniBatchKMeans with
init "k-means++", n_init 20, batch_size 10000, reassignment_ratio 0, fitted on a sample of the
data), written in torch so that it runs on the training device and needs no scikit-learn:
- `Reservoir` keeps a uniform random sample of at most `max_rows` rows of everything added to it
  (each row gets a random priority; the smallest priorities are kept), so memory is bounded
  whatever the data size;
- `fit` runs k-means++ `n_init` times on an initialisation subset (`init_size` rows, scikit-learn's
  default 3 x batch) and keeps the seeding with the lowest inertia on that subset, then `iters`
  mini-batch steps (scikit-learn `_mini_batch_step`: each centre moves to the running mean of every
  row ever assigned to it, i.e. by (sum - n c) / count_total). As with reassignment_ratio 0, a
  centre that receives no rows stays where it is; `KMeansResult.used` reports how many centres the
  sample actually uses, and callers refuse a degenerate codebook.
Every random draw comes from the `torch.Generator` passed in, so a fit is reproducible.

DeepCluster's clustering (Caron et al., ECCV 2018; facebookresearch/deepcluster clustering.py, which
runs faiss) adds, on top of `fit`:
- `pca_whitening` / `whiten_l2`: `preprocess_features`, i.e. faiss PCAMatrix(D, 256,
  eigen_power=-0.5) then L2-normalised rows;
- `lloyd`: full-batch k-means iterations as faiss `Clustering::train`, each assigning every row,
  moving each centre to the mean of its rows and splitting a big cluster for every empty one
  (`split_empty`, faiss `split_clusters`);
- `nmi`: the normalised mutual information between two labelings (scikit-learn
  normalized_mutual_info_score, which the official main.py logs between successive epochs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sslaudio.config import ConfigError


@dataclass
class KMeansConfig:
    k: int = 0  # clusters (0: the method's default, e.g. HuBERT's 100 for MFCC / 500 for model features)
    sample_crops: int = 1000  # training crops the codebook is fitted on
    max_frames: int = 250_000  # frames kept from them (a uniform random subset): bounds memory
    batch: int = 10_000  # rows per mini-batch step (fairseq / scikit-learn batch_size)
    iters: int = 300  # mini-batch steps
    n_init: int = 20  # k-means++ seedings tried, the best kept (fairseq n_init)
    init_size: int = 0  # rows the seedings are tried on (0: 3 x batch, scikit-learn's default)
    min_used: float = 0.5  # a codebook whose sample uses fewer than this fraction of k centres is refused

    def __post_init__(self):
        if self.k < 0 or self.k == 1:
            raise ConfigError(f"method.kmeans.k must be >= 2 (or 0: the method's default), found {self.k}")
        for key in ("sample_crops", "max_frames", "batch", "iters", "n_init"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.kmeans.{key} must be >= 1, found {getattr(self, key)}")
        if self.init_size < 0:
            raise ConfigError(f"method.kmeans.init_size must be >= 0, found {self.init_size}")
        if not 0.0 <= self.min_used <= 1.0:
            raise ConfigError(f"method.kmeans.min_used must be in [0, 1], found {self.min_used}")


@dataclass
class KMeansResult:
    centers: Tensor  # (k, D) float32
    inertia: float  # mean squared distance of the sample's rows to their centre
    used: int  # centres that at least one row of the sample is assigned to
    rows: int  # rows the codebook was fitted on


class Reservoir:
    """A uniform random sample of at most `max_rows` of the rows added (bounded memory)."""

    def __init__(self, max_rows: int, generator: torch.Generator):
        self.max_rows, self.generator = max_rows, generator
        self.rows: Tensor | None = None
        self.keys: Tensor | None = None
        self.seen = 0

    def add(self, x: Tensor) -> None:
        """x (N, D): rows to consider."""
        x = x.detach().float().reshape(-1, x.shape[-1])
        keys = torch.rand(x.shape[0], generator=self.generator, device=self.generator.device).to(x.device)
        self.seen += x.shape[0]
        if self.rows is not None:
            x, keys = torch.cat([self.rows, x]), torch.cat([self.keys, keys])
        if x.shape[0] > self.max_rows:
            keep = torch.topk(keys, self.max_rows, largest=False).indices
            x, keys = x[keep], keys[keep]
        self.rows, self.keys = x, keys


def sq_distances(x: Tensor, centers: Tensor) -> Tensor:
    """(N, D), (k, D) -> (N, k) squared Euclidean distances (clamped at 0)."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ centers.t() + centers.pow(2).sum(1)[None]).clamp_min(0)


def assign(x: Tensor, centers: Tensor, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """(N, D) rows -> (nearest centre (N,) long, its squared distance (N,)), in chunks of rows."""
    x = x.float()
    labels, dists = [], []
    for i in range(0, x.shape[0], chunk):
        d = sq_distances(x[i:i + chunk], centers)
        best = d.min(1)
        labels.append(best.indices)
        dists.append(best.values)
    if not labels:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0)
    return torch.cat(labels), torch.cat(dists)


def kmeans_pp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with probability
    proportional to the squared distance to the nearest centre chosen so far."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
    centers = [x[first]]
    closest = sq_distances(x, x[first][None]).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        if not bool(total > 0):  # fewer distinct rows than k: repeat one (reported as unused later)
            idx = int(torch.randint(n, (1,), generator=generator, device=generator.device))
        else:
            u = torch.rand((), generator=generator, device=generator.device).to(x.device) * total
            idx = int(torch.searchsorted(torch.cumsum(closest, 0), u).clamp_max(n - 1))
        centers.append(x[idx])
        closest = torch.minimum(closest, sq_distances(x, x[idx][None]).squeeze(1))
    return torch.stack(centers)


def fit(x: Tensor, cfg: KMeansConfig, generator: torch.Generator, k: int | None = None) -> KMeansResult:
    """Mini-batch k-means of the rows x (N, D) into `k` (default cfg.k) clusters, N >= k."""
    x = x.float()
    n, k = x.shape[0], k or cfg.k
    if k < 2:
        raise ConfigError(f"k-means: k must be >= 2, found {k}")
    if n < k:
        raise ConfigError(f"k-means: the sample has {n} frames, fewer than the {k} clusters asked for "
                          f"(raise method.kmeans.sample_crops or lower method.kmeans.k)")

    def pick(m: int) -> Tensor:
        return torch.randperm(n, generator=generator, device=generator.device)[:m].to(x.device)

    init = x[pick(min(n, cfg.init_size or 3 * cfg.batch))]
    best, best_inertia = None, math.inf
    for _ in range(cfg.n_init):
        c = kmeans_pp(init, k, generator)
        inertia = float(assign(init, c)[1].sum())
        if inertia < best_inertia:
            best, best_inertia = c, inertia
    centers = best.clone()
    counts = torch.zeros(k, device=x.device)
    for _ in range(cfg.iters):
        rows = x[pick(min(n, cfg.batch))]
        labels, _ = assign(rows, centers)
        n_new = torch.bincount(labels, minlength=k).float()
        sums = torch.zeros_like(centers).index_add_(0, labels, rows)
        counts += n_new
        moved = n_new > 0
        centers[moved] += (sums[moved] - n_new[moved, None] * centers[moved]) / counts[moved, None]
    labels, dists = assign(x, centers)
    return KMeansResult(centers=centers, inertia=float(dists.mean()), used=int(labels.unique().numel()), rows=n)


def usage_entropy(labels: Tensor, k: int, select: Tensor | None = None) -> Tensor:
    """Entropy of the label histogram over log k: 1 when every cluster is used equally, 0 when one
    takes everything. `select` (labels' shape, bool): count only those (no boolean indexing, and a
    scatter rather than bincount, whose output size is data-dependent: no host sync)."""
    labels = labels.reshape(-1)
    w = torch.ones(labels.shape, device=labels.device) if select is None else select.reshape(-1).float()
    p = torch.zeros(k, device=labels.device).scatter_add_(0, labels, w)
    p = p / p.sum().clamp_min(1)
    return -(p * torch.log(p.clamp_min(1e-12))).sum() / math.log(k)


def purity(labels: Tensor, classes: Tensor) -> float:
    """The HuBERT paper's phone purity (Hsu et al. 2021, section V-B), E_z[max_y p(y | z)]: the
    fraction of rows whose class is the most frequent class of their cluster. labels, classes: (N,)
    integers."""
    labels, classes = labels.reshape(-1).long(), classes.reshape(-1).long()
    if labels.numel() == 0:
        return 0.0
    n_cls = int(classes.max()) + 1
    joint = torch.bincount(labels * n_cls + classes, minlength=(int(labels.max()) + 1) * n_cls)
    return float(joint.view(-1, n_cls).max(1).values.sum()) / labels.numel()


# -- DeepCluster: PCA-whitening, full-batch iterations with faiss's empty-cluster split, NMI -------

SPLIT_EPS = 1 / 1024  # faiss Clustering.cpp EPS: "a bit above machine epsilon for float16"


def pca_whitening(x: Tensor, dim: int, rel_floor: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Rows x (N, D) -> (mean (D,), matrix (D, dim)) such that (x - mean) @ matrix holds the `dim`
    leading principal components of x, each scaled to unit variance: faiss PCAMatrix(D, dim,
    eigen_power=-0.5) as DeepCluster's preprocess_features trains it. faiss scales by the
    eigenvalues of the unnormalised scatter matrix (variance N per component instead of 1); the L2
    normalisation that follows in `whiten_l2` makes the two identical. Components whose eigenvalue
    is at most `rel_floor` x the largest (beyond the rank of x, e.g. N <= D) become zero columns
    instead of amplified round-off, as do columns beyond D when dim > D. In float64; each
    eigenvector's sign is fixed (largest entry positive), so the matrix is a function of x alone."""
    x = x.double()
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    ev, vec = torch.linalg.eigh(xc.T @ xc / max(n, 1))  # ascending
    ev, vec = ev.flip(0)[:dim], vec.flip(1)[:, :dim]
    sign = torch.sign(vec.gather(0, vec.abs().argmax(0, keepdim=True)))
    vec = vec * torch.where(sign == 0, torch.ones_like(sign), sign)
    keep = ev > rel_floor * ev[:1].clamp_min(torch.finfo(torch.float64).tiny)
    scale = torch.where(keep, ev.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(ev))
    proj = x.new_zeros(d, dim)
    proj[:, :ev.numel()] = vec * scale
    return mean.float(), proj.float()


def whiten_l2(x: Tensor, mean: Tensor, proj: Tensor) -> Tensor:
    """(N, D) rows -> (N, dim) PCA-whitened (`pca_whitening`'s mean and matrix), L2-normalised rows."""
    return F.normalize((x.float() - mean) @ proj, dim=1)


def split_empty(centers: Tensor, counts: Tensor, generator: torch.Generator) -> int:
    """faiss `split_clusters`, in place on centers (k, D) and counts (k,) float: every empty centre
    (count 0), in order, becomes a copy of a centre cj found by cycling over the clusters from the
    first and accepting each with probability (count_j - 1) / (N - k) (big clusters likely,
    singletons never); the copy and cj get opposite small perturbations (x (1 + eps), x (1 - eps) on
    alternate dimensions, eps = 1/1024) and share cj's count half and half. Returns the number of
    splits. The draws come from `generator` (faiss uses a fixed seed, 1234)."""
    k = centers.shape[0]
    n = float(counts.sum())
    sign = torch.ones(centers.shape[1], device=centers.device)
    sign[1::2] = -1
    splits = 0
    for ci in (counts == 0).nonzero().flatten().tolist():
        p = (counts - 1) / max(n - k, 1.0)
        if not bool((p > 0).any()):  # every row is a singleton already: nothing to split
            break
        while True:  # one pass over the clusters per draw of k numbers: the first accepted wins
            r = torch.rand(k, generator=generator, device=generator.device).to(p.device)
            hit = (r < p).nonzero()
            if hit.numel():
                cj = int(hit[0])
                break
        base = centers[cj].clone()
        centers[ci] = base * (1 + SPLIT_EPS * sign)
        centers[cj] = base * (1 - SPLIT_EPS * sign)
        counts[ci] = counts[cj] / 2
        counts[cj] -= counts[ci]
        splits += 1
    return splits


@dataclass
class LloydResult(KMeansResult):
    labels: Tensor  # (N,) the final assignment of the rows
    counts: Tensor  # (k,) rows per centre in it
    splits: int  # empty clusters split over the iterations


def lloyd(x: Tensor, centers: Tensor, iters: int, generator: torch.Generator) -> LloydResult:
    """`iters` full-batch k-means iterations from centers (k, D) on rows x (N, D), as faiss
    `Clustering::train`: assign every row to its nearest centre, move each centre to the mean of its
    rows, split a big cluster for each empty one (`split_empty`); then assign the rows once more."""
    x = x.float()
    centers = centers.float().clone()
    k = centers.shape[0]
    splits = 0
    for _ in range(iters):
        labels, _ = assign(x, centers)
        counts = torch.bincount(labels, minlength=k).float()
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        moved = counts > 0
        centers[moved] = sums[moved] / counts[moved, None]
        splits += split_empty(centers, counts, generator)
    labels, dists = assign(x, centers)
    counts = torch.bincount(labels, minlength=k).float()
    return LloydResult(centers=centers, inertia=float(dists.mean()) if dists.numel() else 0.0,
                       used=int((counts > 0).sum()), rows=x.shape[0], labels=labels, counts=counts, splits=splits)


def nmi(a: Tensor, b: Tensor, average: str = "geometric") -> float:
    """Normalised mutual information of two labelings a, b (N,) of the same rows: I(a; b) divided by
    sqrt(H(a) H(b)) ("geometric", scikit-learn's normalized_mutual_info_score before 0.22, which the
    official main.py used) or by (H(a) + H(b)) / 2 ("arithmetic", its default since). 1 when both are
    the same partition (also when both put everything in one cluster), 0 when independent."""
    if average not in ("geometric", "arithmetic"):
        raise ValueError(f"nmi: average must be 'geometric' or 'arithmetic', found {average!r}")
    a, b = a.reshape(-1).long(), b.reshape(-1).long()
    n = a.numel()
    if n == 0:
        return 1.0
    _, ia = torch.unique(a, return_inverse=True)
    _, ib = torch.unique(b, return_inverse=True)
    na, nb = int(ia.max()) + 1, int(ib.max()) + 1
    if na == nb == 1:
        return 1.0
    pairs, nij = torch.unique(ia * nb + ib, return_counts=True)  # the contingency table's non-zero cells
    pa = torch.bincount(ia, minlength=na).double() / n
    pb = torch.bincount(ib, minlength=nb).double() / n
    pij = nij.double() / n
    mi = float((pij * (pij.log() - pa[pairs // nb].log() - pb[pairs % nb].log())).sum())
    ha, hb = float(-(pa * pa.log()).sum()), float(-(pb * pb.log()).sum())
    norm = math.sqrt(ha * hb) if average == "geometric" else (ha + hb) / 2
    return max(mi, 0.0) / norm if norm > 0 else 0.0
