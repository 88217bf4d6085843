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


@_fp32
def apc_l1_loss(pred: Tensor, frames: Tensor, shift: int, padding: Tensor | None = None) -> Tensor:
    """APC: mean absolute error between the prediction made at step t and the frame `shift` steps on.

    Chung, Hsu, Tang & Glass 2019, "An Unsupervised Autoregressive Model for Speech Representation
    Learning", eq. 1 (L1 over the predicted frames); official train_apc.py
    `nn.L1Loss()(model(x[:, :-n]), x[:, n:])`. Pairs (t, t + n) count where step t + n is valid,
    and the mean runs over those pairs and the F bins. The official mean also covers the padded
    tail of shorter utterances; here padding is excluded, so an item scores the same in any batch.

    pred: (B, T, F) the method's prediction at every step t. frames: (B, T, F) the input frames
    (the targets, detached here). shift: n >= 1. padding: (B, T) bool, True at padded steps.
    Returns a () loss.
    """
    if pred.dim() != 3 or pred.shape != frames.shape:
        raise ValueError(f"apc_l1_loss: expected pred and frames of one (B, T, F) shape, "
                         f"found {tuple(pred.shape)} and {tuple(frames.shape)}")
    if shift < 1:
        raise ValueError(f"apc_l1_loss: shift must be >= 1, found {shift}")
    B, T, n_bins = pred.shape
    if T <= shift:
        raise ValueError(f"apc_l1_loss: {T} frames leave no target {shift} steps ahead")
    if padding is not None and tuple(padding.shape) != (B, T):
        raise ValueError(f"apc_l1_loss: expected padding ({B}, {T}), found {tuple(padding.shape)}")
    err = (pred[:, :T - shift].float() - frames[:, shift:].detach().float()).abs()  # (B, T - n, F)
    if padding is None:
        return err.mean()
    valid = ~padding[:, shift:]  # (B, T - n): the target step t + n is a real frame
    if not bool(valid.any()):
        raise ValueError(f"apc_l1_loss: no item is longer than shift {shift} frames")
    return err.masked_fill(~valid.unsqueeze(-1), 0.0).sum() / (valid.sum() * n_bins)


@_fp32
def cpc_info_nce(pred: Tensor, positive: Tensor, negatives: Tensor, valid: Tensor | None = None) -> LossOut:
    """CPC InfoNCE: each prediction W_k c_t must pick its true future z_{t+k} among negatives.

    van den Oord, Li & Vinyals 2018, "Representation Learning with Contrastive Predictive Coding",
    eq. 4; facebookresearch/CPC_audio cpc/criterion/criterion.py `CPCUnsupersivedCriterion`: the
    score of a candidate z is mean_d (W_k c_t)_d z_d (`(locC * candidates[k]).mean(dim=3)`: the
    dot product over D), the positive sits at index 0 of the candidates, the loss per k is the
    cross-entropy with label 0 averaged over anchors, and the negatives are drawn once per anchor
    and shared by every k (`sampleClean`). CPC_audio sums the K losses; this is their mean.

    pred: (K, N, D) predictions W_k c_t of N anchors for offsets k = 1..K.
    positive: (K, N, D) the true z_{t+k}. negatives: (N, M, D) shared by the K offsets.
    valid: (N,) bool, False for anchors to leave out (padding), or None.
    terms: acc (mean over k of the fraction of anchors that score the positive highest) and
    acc_<k> for every offset k = 1..K.
    """
    if pred.dim() != 3 or pred.shape != positive.shape:
        raise ValueError(f"cpc_info_nce: expected pred and positive of one (K, N, D) shape, "
                         f"found {tuple(pred.shape)} and {tuple(positive.shape)}")
    K, N, D = pred.shape
    if negatives.dim() != 3 or negatives.shape[0] != N or negatives.shape[2] != D:
        raise ValueError(f"cpc_info_nce: expected negatives ({N}, M, {D}), found {tuple(negatives.shape)}")
    if valid is not None and tuple(valid.shape) != (N,):
        raise ValueError(f"cpc_info_nce: expected valid ({N},), found {tuple(valid.shape)}")
    pred, positive, negatives = pred.float(), positive.float(), negatives.float()
    pos = (pred * positive).sum(-1, keepdim=True)  # (K, N, 1)
    neg = torch.einsum("knd,nmd->knm", pred, negatives)  # (K, N, M)
    logits = torch.cat([pos, neg], dim=-1) / D  # (K, N, 1 + M), positive at index 0
    labels = torch.zeros(K * N, dtype=torch.long, device=pred.device)
    ce = F.cross_entropy(logits.reshape(K * N, -1), labels, reduction="none").view(K, N)
    hit = (logits.argmax(dim=-1) == 0).float()  # (K, N); a tie goes to index 0, as torch.max
    if valid is None:
        loss_k, acc_k = ce.mean(dim=1), hit.mean(dim=1)
    else:
        n = valid.sum()
        if not bool(n > 0):
            raise ValueError("cpc_info_nce: no valid anchor")
        w = valid.float()
        loss_k, acc_k = (ce * w).sum(dim=1) / n, (hit * w).sum(dim=1) / n
    terms = {"acc": acc_k.mean().detach(), **{f"acc_{k + 1}": acc_k[k].detach() for k in range(K)}}
    return LossOut(loss_k.mean(), terms)


@_fp32
def masked_reconstruction_loss(pred: Tensor, target: Tensor, mask: Tensor, kind: str = "l1") -> Tensor:
    """Masked acoustic model loss: the mean over the selected elements of |pred - target| ("l1")
    or (pred - target)^2 ("mse"); every other element is ignored.

    Mockingjay (Liu et al., ICASSP 2020) and TERA (Liu, Li, Lee, TASLP 2021); s3prl
    pretrain/mockingjay/pretrain_expert.py `TransformerForMaskedAcousticModel`:
    `nn.L1Loss()(pred.masked_select(mask_label), target.masked_select(mask_label))` (L1 in the
    released configs, MSE as the option). The mask selects single elements, so TERA's frequency
    band (some bins of a frame) counts bin by bin. No selected element gives a loss of 0.

    pred, target: (..., F) reconstructions and original features (target detached).
    mask: bool of the same shape, True where the loss applies. Returns a () float32 loss.
    """
    if pred.shape != target.shape or mask.shape != pred.shape:
        raise ValueError(f"masked_reconstruction_loss: expected pred, target and mask of one shape, "
                         f"found {tuple(pred.shape)}, {tuple(target.shape)} and {tuple(mask.shape)}")
    if kind not in ("l1", "mse"):
        raise ValueError(f"masked_reconstruction_loss: kind={kind!r}; use 'l1' or 'mse'")
    diff = pred.float() - target.detach().float()
    per_elem = diff.abs() if kind == "l1" else diff.pow(2)
    m = mask.to(per_elem.dtype)
    return (per_elem * m).sum() / m.sum().clamp_min(1.0)


def _dist_entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of distributions along `dim`; 0 log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(dim=dim)


@_fp32
def dino_loss(student: Tensor, teacher: Tensor, center: Tensor, teacher_temp: float = 0.04,
              student_temp: float = 0.1) -> LossOut:
    """DINO: the student's distribution of every crop predicts the teacher's of every other global crop.

    Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", eq. 3 and
    Alg. 1; facebookresearch/dino `main_dino.py` `DINOLoss`. Teacher p_t = softmax((t - center) /
    teacher_temp), detached; student log p_s = log_softmax(s / student_temp). For every pair
    (teacher global crop i, student crop v) with v != i: mean over the batch of
    -Σ_k p_t[i] log p_s[v]; the loss is the mean over the pairs (the official total / n_loss_terms).
    Updating the centre (momentum 0.9 on the batch mean of the raw teacher outputs) is the
    method's job.

    student: (V, N, K) head outputs of the V crops, the G global crops first.
    teacher: (G, N, K) teacher head outputs of the global crops, G <= V; detached here.
    center: (K,) the running centre of the teacher outputs.
    terms: teacher_entropy (mean over the teacher rows of H(p_t): 0 for one-hot collapse) and
      teacher_mean_entropy (H of the batch-mean p_t: log K for uniform collapse, when
      teacher_entropy is log K too).
    """
    if student.dim() != 3 or teacher.dim() != 3 or teacher.shape[1:] != student.shape[1:]:
        raise ValueError(f"dino_loss: expected student (V, N, K) and teacher (G, N, K), "
                         f"found {tuple(student.shape)} and {tuple(teacher.shape)}")
    V, N, K = student.shape
    G = teacher.shape[0]
    if not 1 <= G <= V or V < 2:
        raise ValueError(f"dino_loss: needs 1 <= G <= V global teacher crops and V >= 2 student crops, "
                         f"found G={G}, V={V}")
    if center.shape[-1] != K or center.numel() != K:
        raise ValueError(f"dino_loss: expected a ({K},) center, found {tuple(center.shape)}")
    log_ps = F.log_softmax(student.float() / student_temp, dim=-1)  # (V, N, K)
    pt = F.softmax((teacher.detach().float() - center.detach().float().reshape(K)) / teacher_temp, dim=-1)
    cross = -(pt.reshape(G, N * K) @ log_ps.reshape(V, N * K).T) / N  # (G, V) mean CE of each pair
    pairs = torch.arange(G, device=student.device)[:, None] != torch.arange(V, device=student.device)[None]
    loss = cross[pairs].mean()
    terms = {"teacher_entropy": _dist_entropy(pt).mean().detach(),
             "teacher_mean_entropy": _dist_entropy(pt.reshape(G * N, K).mean(dim=0)).detach()}
    return LossOut(loss, terms)


@_fp32
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3,
             gather_fn: GatherFn | None = None) -> Tensor:
    """SwAV equipartitioned soft assignments of N samples to K prototypes (Sinkhorn-Knopp).

    Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
    Assignments", eq. 3 and sec. 3.1; facebookresearch/swav `main_swav.py` `distributed_sinkhorn`:
    Q = exp(scores / ε)ᵀ (K, B), Q /= ΣQ, then `iterations` times: each prototype's row scaled to
    sum 1/K, each sample's column scaled to sum 1/B; finally Q *= B and back to (B, K). So every
    returned row (a sample's assignment) sums to exactly 1, and every column (a prototype's load)
    sums to about B/K (exactly after infinitely many iterations). Computed in the log domain
    (each normalisation a logsumexp subtraction): the same numbers, but exp(scores / ε) can neither
    overflow nor underflow to an all-zero row for scores far from [-1, 1].

    scores: (N, K) scores (SwAV: cosines of embeddings and prototypes), detached here.
    gather_fn: with several processes, maps the local (N, K) block to (every process's rows,
      offset); the iterations then run over all of them (what the official all_reduce of the sums
      does) and the local rows are returned. None: one process.
    Returns (N, K) float32 assignments, no gradient.
    """
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"sinkhorn: expected (N, K) scores with N >= 1, found {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 0:
        raise ValueError(f"sinkhorn: epsilon must be positive and iterations >= 0, found {epsilon}, {iterations}")
    with torch.no_grad():
        local = scores.detach().float()
        rows, offset = _gather("sinkhorn", local, gather_fn)
        B, K = rows.shape
        log_q = rows / epsilon
        log_q = log_q - torch.logsumexp(log_q.flatten(), dim=0)  # the whole matrix sums to 1
        for _ in range(iterations):
            log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(K)  # prototypes: 1/K
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(B)  # samples: 1/B
        q = torch.exp(log_q + math.log(B))  # each sample's assignment sums to 1
        return q[offset:offset + local.shape[0]]


@_fp32
def swav_loss(scores: Tensor, crops_for_assign: Sequence[int] = (0, 1), temperature: float = 0.1,
              epsilon: float = 0.05, iterations: int = 3, queue_scores: Tensor | None = None,
              gather_fn: GatherFn | None = None) -> LossOut:
    """SwAV swapped prediction: the codes q of one crop are predicted from every other crop.

    Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
    Assignments", eq. 1-2; facebookresearch/swav `main_swav.py` `train`. For each crop i in
    `crops_for_assign`: q_i = sinkhorn(scores_i) (with the queue's scores prepended, then the
    batch's rows kept), and sub-loss_i = mean over the crops v != i of the batch mean of
    -Σ_k q_i log softmax(scores_v / τ); the loss is the mean of the sub-losses.

    scores: (V, N, K) prototype scores of the V crops (cosines: L2-normalised embeddings against
      L2-normalised prototypes). queue_scores: (A, L, K) scores of the queued embeddings of each
      assigned crop, or None. gather_fn: see `sinkhorn`.
    terms: q_entropy (mean over samples of H(q): 0 for hard codes) and q_mean_entropy (H of the
      batch-mean q, log K under perfect equipartition), both averaged over the assigned crops.
    """
    if scores.dim() != 3 or scores.shape[0] < 2:
        raise ValueError(f"swav_loss: expected (V, N, K) scores of V >= 2 crops, found {tuple(scores.shape)}")
    V, N, K = scores.shape
    assign = list(crops_for_assign)
    if not assign or len(set(assign)) != len(assign) or not all(0 <= i < V for i in assign):
        raise ValueError(f"swav_loss: crops_for_assign {assign} must be distinct crop indices in [0, {V})")
    if queue_scores is not None and (queue_scores.dim() != 3 or queue_scores.shape[0] != len(assign)
                                     or queue_scores.shape[2] != K):
        raise ValueError(f"swav_loss: expected queue_scores ({len(assign)}, L, {K}), "
                         f"found {tuple(queue_scores.shape)}")
    log_p = F.log_softmax(scores.float() / temperature, dim=-1)  # (V, N, K)
    others = torch.ones(V, dtype=torch.bool, device=scores.device)
    loss, h, h_mean = 0.0, 0.0, 0.0
    for a, i in enumerate(assign):
        s = scores[i]
        if queue_scores is not None:
            s = torch.cat([queue_scores[a], s])
        q = sinkhorn(s, epsilon, iterations, gather_fn)[-N:]  # (N, K), this batch's rows
        cross = -(log_p * q).sum(dim=-1).mean(dim=-1)  # (V,) batch-mean CE of every crop against q
        mask = others.clone()
        mask[i] = False
        loss = loss + cross[mask].mean()
        h = h + _dist_entropy(q).mean()
        h_mean = h_mean + _dist_entropy(q.mean(dim=0))
    A = len(assign)
    return LossOut(loss / A, {"q_entropy": (h / A).detach(), "q_mean_entropy": (h_mean / A).detach()})
