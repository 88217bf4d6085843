"""Pure loss functions shared by the methods, each following its paper and official code.

Return convention: a loss with a single term (byol_loss, negative_cosine, regression_loss)
returns its float32 scalar Tensor. A loss whose parts are worth logging (the contrastive ones:
positive / negative similarity; Barlow Twins and VICReg: their unweighted terms) returns
`LossOut(loss, terms)`: `loss` the float32 scalar carrying the gradient, `terms` a dict of
detached float32 scalar tensors (tensors, so computing a loss never forces a device sync; the
trainer calls `.item()` when it logs). `loss, terms = nt_xent(z1, z2)` unpacks it; adding two
LossOut raises, so symmetrise with `a.loss + b.loss`. Embedding collapse monitors are the
method's (`sslaudio.methods.base.embedding_std`).

Every function computes in float32 with autocast switched off, whatever the input dtype: the
normalisations, exponentials and (N, N) correlations here lose too much in fp16/bf16.

Symmetrisation over the two views is the caller's job (each function is one direction), and so
is any queue or EMA update. Arguments the paper treats as targets (under stop-gradient or from a
momentum encoder) are detached inside, so no caller can forget it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# gather_fn(local (N, D)) -> (all processes' rows (M, D), offset of the local rows in them)
GatherFn = Callable[[Tensor], tuple[Tensor, int]]

_BN_EPS = 1e-5  # nn.BatchNorm1d's default eps, which Barlow Twins' `self.bn` uses
_IN_EPS = 1e-5  # F.instance_norm's default eps, which data2vec uses


@dataclass(frozen=True)
class LossOut:
    """A loss and its detached parts; unpacks as `loss, terms`. Not a tuple: `a + b` raises."""

    loss: Tensor  # () float32, differentiable
    terms: dict[str, Tensor]  # detached () float32 tensors to log

    def __iter__(self) -> Iterator:
        return iter((self.loss, self.terms))


def _fp32(fn):
    """Run `fn` with autocast disabled on the device of its first tensor argument."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next(iter((*args, *kwargs.values())))
        if not isinstance(first, Tensor):  # a sequence of layers
            if not first:
                return fn(*args, **kwargs)  # nothing to compute; fn reports the empty input
            first = first[0]
        with torch.autocast(device_type=first.device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _check_2d_pair(name: str, a: Tensor, b: Tensor, min_rows: int = 1) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two (N, D) tensors of equal shape, "
                         f"found {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{name}: needs a batch of at least {min_rows}, found {a.shape[0]}")


def _off_diagonal(m: Tensor) -> Tensor:
    """The off-diagonal entries of a square (D, D) matrix, flattened to (D * (D - 1),)."""
    return m[~torch.eye(m.shape[0], dtype=torch.bool, device=m.device)]


def _gather(name: str, z: Tensor, gather_fn: GatherFn | None) -> tuple[Tensor, int]:
    if gather_fn is None:
        return z, 0
    all_z, offset = gather_fn(z)
    n = z.shape[0]
    if all_z.dim() != 2 or all_z.shape[1] != z.shape[1] or not 0 <= offset <= all_z.shape[0] - n:
        raise ValueError(f"{name}: gather_fn returned rows {tuple(all_z.shape)} with offset {offset}, "
                         f"which cannot hold the local ({n}, {z.shape[1]}) block")
    return all_z, int(offset)


@_fp32
def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL regression loss 2 - 2 cos(p, sg(z)), mean over the batch.

    Grill et al. 2020, "Bootstrap your own latent", eq. 2; deepmind-research/byol `regression_loss`
    (the squared distance of L2-normalised vectors, equal to 2 - 2 cos). One direction: BYOL,
    BYOL-A and ATST sum `byol_loss(p1, z2) + byol_loss(p2, z1)`.

    p: (N, D) online prediction. z: (N, D) target projection, detached here. Returns a () loss.
    """
    _check_2d_pair("byol_loss", p, z)
    p, z = p.float(), z.detach().float()
    cos = (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1)  # (N,)
    return (2.0 - 2.0 * cos).mean()


@_fp32
def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam D(p, z) = -cos(p, stopgrad(z)), mean over the batch.

    Chen & He 2021, "Exploring Simple Siamese Representation Learning", eq. 1-3;
    facebookresearch/simsiam (nn.CosineSimilarity, z detached). The paper's symmetric loss is
    `0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)`, the caller's job.

    p: (N, D) prediction. z: (N, D) projection, detached here. Returns a () loss.
    The paper's collapse signal, the std of L2-normalised z, is `base.embedding_std`.
    """
    _check_2d_pair("negative_cosine", p, z)
    p, z = p.float(), z.detach().float()
    return -(F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1).mean()


@_fp32
def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.1,
            gather_fn: GatherFn | None = None) -> LossOut:
    """SimCLR NT-Xent: each of the 2N views must find its partner among the other 2N - 1.

    Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
    eq. 1; google-research/simclr `objective.add_contrastive_loss`. Cosine similarity over τ,
    2N - 2 in-batch negatives per anchor, cross-entropy averaged over the 2N anchors. The TF code
    returns loss_a + loss_b, i.e. twice this value (a constant factor the learning rate absorbs);
    we average like the paper's L = 1/(2N) Σ l(i, j) and lightly's NTXentLoss. τ = 0.1 is the
    ImageNet default (0.5 for CIFAR-10).

    z1, z2: (N, D) projections of the two views (row i of each is the same clip).
    gather_fn: for multi-process training, maps the local L2-normalised float32 rows (N, D) to
      (rows of every process (M, D), offset of the local rows in them); it is called once for z1
      and once for z2 and must give the same offset. The local anchors are then compared with all
      2M candidates, as the official TPU code does. Use a differentiable all-gather (backward
      all-reduces, like VICReg's FullGatherLayer) so that the other processes' anchors also push
      on the local rows, as TPU cross_replica_sum does.
    terms: pos_sim (mean cosine to the positive), neg_sim (mean cosine to the negatives).
    """
    _check_2d_pair("nt_xent", z1, z2)
    n = z1.shape[0]
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    all1, off1 = _gather("nt_xent", z1, gather_fn)
    all2, off2 = _gather("nt_xent", z2, gather_fn)
    if off1 != off2 or all1.shape != all2.shape:
        raise ValueError(f"nt_xent: gather_fn gave rows {tuple(all1.shape)} at offset {off1} for z1 "
                         f"but {tuple(all2.shape)} at offset {off2} for z2; they must match")
    m = all1.shape[0]
    sim = torch.cat([z1, z2]) @ torch.cat([all1, all2]).T  # (2N, 2M) cosines
    local = torch.arange(n, device=z1.device) + off1
    self_idx = torch.cat([local, local + m])  # an anchor's own column
    pos_idx = torch.cat([local + m, local])  # the other view of the same clip
    rows = torch.arange(2 * n, device=z1.device)
    is_self = torch.zeros_like(sim, dtype=torch.bool)
    is_self[rows, self_idx] = True
    logits = (sim / temperature).masked_fill(is_self, float("-inf"))
    loss = F.cross_entropy(logits, pos_idx)
    is_neg = ~is_self
    is_neg[rows, pos_idx] = False
    terms = {"pos_sim": sim[rows, pos_idx].mean().detach(), "neg_sim": sim[is_neg].mean().detach()}
    return LossOut(loss, terms)


@_fp32
def info_nce_queue(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2) -> LossOut:
    """MoCo InfoNCE: logits [q·k, q·queueᵀ] / τ, cross-entropy with the positive at index 0.

    He et al. 2020, "Momentum Contrast", eq. 1 (τ = 0.07); Chen et al. 2020, "Improved Baselines
    with Momentum Contrastive Learning" (MoCo v2, τ = 0.2 with the MLP head);
    facebookresearch/moco `moco/builder.py`. q, k and the queue rows are L2-normalised here (the
    official code normalises q, k and every enqueued key). Updating the queue is the method's job.

    q: (N, D) queries. k: (N, D) keys from the momentum encoder, detached.
    queue: (K, D) earlier keys, one per row (the official buffer is stored transposed), detached.
    terms: pos_sim (mean q·k), neg_sim (mean q·queue).
    """
    _check_2d_pair("info_nce_queue", q, k)
    if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"info_nce_queue: expected queue (K, {q.shape[1]}), found {tuple(queue.shape)}")
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    queue = F.normalize(queue.detach().float(), dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    neg = q @ queue.T  # (N, K)
    logits = torch.cat([pos, neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits, labels)
    return LossOut(loss, {"pos_sim": pos.mean().detach(), "neg_sim": neg.mean().detach()})


@_fp32
def moco_v3_loss(q: Tensor, k: Tensor, temperature: float = 0.2,
                 gather_fn: GatherFn | None = None) -> LossOut:
    """MoCo v3 contrastive loss: logits q·kᵀ / τ over the batch, labels arange, CE times 2τ.

    Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers",
    Alg. 1; facebookresearch/moco-v3 `moco/builder.py` `contrastive_loss`/`ctr_loss`, which
    multiplies the cross-entropy by 2τ. τ = 0.2 is the ViT setting (the code's default 1.0 is
    for ResNet-50). One direction: the method returns `moco_v3_loss(q1, k2) + moco_v3_loss(q2, k1)`.

    q: (N, D) online predictions. k: (N, D) momentum-encoder projections, detached.
    gather_fn: maps the local L2-normalised keys (N, D) to (all processes' keys (M, D), offset of
      the local block); the positive of local query i is then key offset + i (the official
      `labels = arange(N) + N * rank`). Keys carry no gradient, so a plain all_gather will do.
    terms: pos_sim (mean cosine to the positive key), neg_sim (mean cosine to the other keys).
    """
    _check_2d_pair("moco_v3_loss", q, k)
    n = q.shape[0]
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    all_k, offset = _gather("moco_v3_loss", k, gather_fn)
    sim = q @ all_k.T  # (N, M)
    labels = torch.arange(n, device=q.device) + offset
    loss = F.cross_entropy(sim / temperature, labels) * (2.0 * temperature)
    is_pos = torch.zeros_like(sim, dtype=torch.bool)
    is_pos[torch.arange(n, device=q.device), labels] = True
    neg = sim[~is_pos]
    neg_sim = neg.mean() if neg.numel() else torch.full((), float("nan"), device=q.device)
    return LossOut(loss, {"pos_sim": sim[is_pos].mean().detach(), "neg_sim": neg_sim.detach()})


@_fp32
def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 5e-3) -> LossOut:
    """Barlow Twins: push the cross-correlation of the standardised views to the identity.

    Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", eq. 1
    (λ = 5e-3; the official main.py default is 0.0051); facebookresearch/barlowtwins `main.py`.
    Each dimension is standardised over the batch as the official non-affine BatchNorm1d does in
    training mode: biased variance, eps 1e-5. c = z1nᵀ z2n / N, loss = Σ_i (1 - c_ii)² +
    λ Σ_{i≠j} c_ij². The value is symmetric in (z1, z2): swapping them transposes c.

    z1, z2: (N, D) projections of the two views, N >= 2.
    terms: on_diag and off_diag, unweighted.
    """
    _check_2d_pair("barlow_twins_loss", z1, z2, min_rows=2)
    n = z1.shape[0]

    def standardise(z: Tensor) -> Tensor:
        z = z.float()
        return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + _BN_EPS)

    c = standardise(z1).T @ standardise(z2) / n  # (D, D)
    on_diag = (torch.diagonal(c) - 1.0).pow(2).sum()
    off_diag = _off_diagonal(c).pow(2).sum()
    loss = on_diag + lambd * off_diag
    return LossOut(loss, {"on_diag": on_diag.detach(), "off_diag": off_diag.detach()})


@_fp32
def vicreg_loss(z1: Tensor, z2: Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, eps: float = 1e-4) -> LossOut:
    """VICReg: invariance + variance + covariance regularisation of two embeddings.

    Bardes, Ponce & LeCun 2022, "VICReg", eq. 1-6 (λ = μ = 25, ν = 1); facebookresearch/vicreg
    `main_vicreg.py`. invariance = MSE(z1, z2) averaged over N·D; variance = mean_d relu(1 -
    sqrt(Var_d + eps)) per branch (unbiased Var), the two branches averaged (official `/ 2`);
    covariance = Σ_{i≠j} Cov_ij² / D per branch with Cov = z̄ᵀz̄ / (N - 1), the two branches summed.

    z1, z2: (N, D) expander outputs, N >= 2.
    terms: invariance, variance, covariance, unweighted.
    """
    _check_2d_pair("vicreg_loss", z1, z2, min_rows=2)
    n, d = z1.shape
    z1, z2 = z1.float(), z2.float()
    invariance = F.mse_loss(z1, z2)
    z1 = z1 - z1.mean(dim=0)
    z2 = z2 - z2.mean(dim=0)
    std1 = torch.sqrt(z1.var(dim=0) + eps)
    std2 = torch.sqrt(z2.var(dim=0) + eps)
    variance = F.relu(1.0 - std1).mean() / 2 + F.relu(1.0 - std2).mean() / 2
    cov1 = z1.T @ z1 / (n - 1)
    cov2 = z2.T @ z2 / (n - 1)
    covariance = _off_diagonal(cov1).pow(2).sum() / d + _off_diagonal(cov2).pow(2).sum() / d
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    terms = {"invariance": invariance.detach(), "variance": variance.detach(),
             "covariance": covariance.detach()}
    return LossOut(loss, terms)


def _instance_norm(x: Tensor, padding: Tensor | None) -> Tensor:
    """Normalise each channel of each sample over its valid time steps. x: (B, T, D)."""
    if padding is None:
        if x.shape[1] > 1:
            return F.instance_norm(x.transpose(1, 2), eps=_IN_EPS).transpose(1, 2)
        padding = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)  # F refuses T == 1
    keep = (~padding).unsqueeze(-1)  # (B, T, 1)
    x = x.masked_fill(~keep, 0.0)  # padded steps may hold anything, even NaN
    n = keep.sum(dim=1, keepdim=True).clamp_min(1)  # (B, 1, 1)
    mean = x.sum(dim=1, keepdim=True) / n
    centred = (x - mean).masked_fill(~keep, 0.0)
    var = centred.pow(2).sum(dim=1, keepdim=True) / n  # biased, as F.instance_norm
    return centred * torch.rsqrt(var + _IN_EPS)


@_fp32
def average_top_k_layers(layers: Sequence[Tensor], k: int, instance_norm: bool = True,
                         final_norm: str | None = None, padding: Tensor | None = None) -> Tensor:
    """data2vec teacher targets: the mean of the last k layer outputs, each instance-normalised.

    Baevski et al. 2022, "data2vec", sec. 3.3 (K = 8 for speech); fairseq
    examples/data2vec/models/data2vec_audio.py (`instance_norm_target_layer`, then
    `layer_norm_targets` / `instance_norm_targets` on the average). Instance norm standardises
    every channel of every sample over time (F.instance_norm on (B, D, T), biased variance,
    eps 1e-5). Unlike fairseq, which lets padded steps into the statistics, statistics here use
    the valid steps only, so a padded clip gets the same targets as the clip alone; padded steps
    come back as 0. Without padding this is exactly F.instance_norm.

    layers: per-layer outputs, each (B, T, D), first to last. k: how many of the last to average.
    final_norm: None, "layer_norm" (over D, no affine) or "instance_norm" (over valid time).
    padding: (B, T) bool, True at padded steps, or None.
    Returns the float32 targets (B, T, D); no gradient is cut (the teacher runs under no_grad).
    """
    if not 1 <= k <= len(layers):
        raise ValueError(f"average_top_k_layers: k={k} but {len(layers)} layers were given")
    if final_norm not in (None, "layer_norm", "instance_norm"):
        raise ValueError(f"average_top_k_layers: final_norm={final_norm!r}; "
                         "use None, 'layer_norm' or 'instance_norm'")
    top = [t.float() for t in layers[-k:]]
    shape = top[0].shape
    if len(shape) != 3 or any(t.shape != shape for t in top):
        raise ValueError(f"average_top_k_layers: expected k layers of one (B, T, D) shape, "
                         f"found {[tuple(t.shape) for t in top]}")
    if padding is not None and tuple(padding.shape) != tuple(shape[:2]):
        raise ValueError(f"average_top_k_layers: expected padding {tuple(shape[:2])}, "
                         f"found {tuple(padding.shape)}")
    if instance_norm:
        top = [_instance_norm(t, padding) for t in top]
    y = sum(top) / k
    if final_norm == "layer_norm":
        y = F.layer_norm(y, y.shape[-1:])
    elif final_norm == "instance_norm":
        y = _instance_norm(y, padding)
    if padding is not None:
        y = y.masked_fill(padding.unsqueeze(-1), 0.0)
    return y


@_fp32
def regression_loss(pred: Tensor, target: Tensor, beta: float = 0.0) -> Tensor:
    """data2vec regression: per token Σ_d loss(pred_d, target_d) / sqrt(D), mean over tokens.

    Baevski et al. 2022, "data2vec", eq. 2; fairseq examples/data2vec/models/data2vec_audio.py:
    beta == 0 -> squared error (the released audio configs use loss_beta 0), else smooth-L1 with
    that beta; summed over D, scaled by 1 / sqrt(D) (`loss_scale` unset), summed over tokens and
    divided by the token count (the criterion's sample_size). The caller selects the tokens
    (data2vec: the masked ones). No tokens gives a loss of 0.

    pred: (..., D) student predictions. target: (..., D) teacher targets, detached.
    Returns a () loss. data2vec's collapse signals (pred_var / target_var) are the method's.
    """
    if pred.shape != target.shape or pred.dim() < 1:
        raise ValueError(f"regression_loss: expected pred and target of one (..., D) shape, "
                         f"found {tuple(pred.shape)} and {tuple(target.shape)}")
    if beta < 0:
        raise ValueError(f"regression_loss: beta={beta}; use 0 for MSE or a positive smooth-L1 beta")
    d = pred.shape[-1]
    pred, target = pred.float(), target.detach().float()
    if beta == 0:
        per_elem = F.mse_loss(pred, target, reduction="none")
    else:
        per_elem = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    per_token = per_elem.sum(dim=-1) / math.sqrt(d)
    return per_token.sum() / max(per_token.numel(), 1)
