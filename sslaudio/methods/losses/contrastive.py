"""Contrastive (InfoNCE-family) losses: SimCLR, MoCo v2 / v3, CPC and wav2vec 2.0."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslaudio.methods.losses._common import (
    GatherFn,
    LossOut,
    _check_2d_pair,
    _fp32,
    _gather,
)


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
    # every row has 2M - 2 negatives: a masked sum over a static count, no boolean indexing (host sync)
    neg_sim = sim.detach().masked_fill(~is_neg, 0.0).sum() / max(2 * n * (2 * m - 2), 1)
    terms = {"pos_sim": sim[rows, pos_idx].mean().detach(), "neg_sim": neg_sim}
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
    pos = sim.detach().gather(1, labels[:, None])  # (N, 1); every row has M - 1 negatives
    m = sim.shape[1]
    neg_sim = (sim.detach().sum() - pos.sum()) / (n * (m - 1)) if m > 1 else \
        torch.full((), float("nan"), device=q.device)
    return LossOut(loss, {"pos_sim": pos.mean(), "neg_sim": neg_sim})


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
def wav2vec2_contrastive(pred: Tensor, targets: Tensor, neg_idx: Tensor, temperature: float = 0.1) -> LossOut:
    """wav2vec 2.0 contrastive loss: each masked frame's prediction must pick its quantized target
    among K distractors, which are other rows of `targets`.

    Baevski, Zhou, Mohamed & Auli 2020, "wav2vec 2.0", eq. 3; fairseq
    `models/wav2vec/wav2vec2.py` (`compute_preds`) and `criterions/wav2vec_criterion.py` (infonce).
    Logits are cos(pred, candidate) / κ with the target at index 0; a distractor equal to the
    target in every dimension (fairseq `neg_is_pos`: the same code, or a lone masked frame's
    distractors pointing at itself) gets a logit of -inf. The loss is the cross-entropy summed over
    the M frames divided by M (fairseq's sum / sample_size). Distractors are not detached: as in
    fairseq, the quantizer learns from the target and from the distractors. Memory is M x K x D,
    as fairseq's gathered negatives.

    pred: (M, D) context network outputs at the masked frames after final_proj.
    targets: (M, D) quantized targets of the same frames after project_q.
    neg_idx: (M, K) long, rows of `targets` used as distractors of each frame.
    terms: acc, fairseq's `correct / count`: the fraction of frames whose target has the largest
      logit and not also the smallest (all logits equal counts as wrong).
    """
    if pred.dim() != 2 or pred.shape != targets.shape:
        raise ValueError(f"wav2vec2_contrastive: expected pred and targets of one (M, D) shape, "
                         f"found {tuple(pred.shape)} and {tuple(targets.shape)}")
    if neg_idx.dim() != 2 or neg_idx.shape[0] != pred.shape[0]:
        raise ValueError(f"wav2vec2_contrastive: expected neg_idx ({pred.shape[0]}, K), found {tuple(neg_idx.shape)}")
    if pred.shape[0] == 0:
        raise ValueError("wav2vec2_contrastive: no masked frame")
    negs = targets[neg_idx]  # (M, K, D)
    neg_is_pos = (negs == targets.unsqueeze(1)).all(-1)  # (M, K), before any cast: exact equality
    cands = torch.cat([targets.unsqueeze(1), negs], dim=1).float()  # (M, 1 + K, D), target first
    logits = F.cosine_similarity(pred.float().unsqueeze(1), cands, dim=-1) / temperature
    logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(neg_is_pos, float("-inf"))], dim=1)
    labels = torch.zeros(pred.shape[0], dtype=torch.long, device=pred.device)
    loss = F.cross_entropy(logits, labels, reduction="sum") / pred.shape[0]
    with torch.no_grad():
        correct = (logits.argmax(-1) == 0) & ~(logits.argmin(-1) == 0)
    return LossOut(loss, {"acc": correct.float().mean()})
