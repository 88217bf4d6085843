"""Clustering / self-distillation losses: DINO, and SwAV with its Sinkhorn-Knopp assignments."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sslaudio.methods.losses._common import GatherFn, LossOut, _fp32, _gather


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
    loss = (cross * pairs).sum() / (G * V - G)  # the G x V pairs but a crop with itself (static count)
    terms = {"teacher_entropy": _dist_entropy(pt).mean().detach(),
             "teacher_mean_entropy": _dist_entropy(pt.reshape(G * N, K).mean(dim=0)).detach()}
    return LossOut(loss, terms)


@_fp32
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3,
             gather_fn: GatherFn | None = None) -> Tensor:
    """SwAV's equipartitioned soft assignments (N, K) of N samples to K prototypes, no gradient.

    Caron et al. 2020, eq. 3; facebookresearch/swav `distributed_sinkhorn`: Q = exp(scores / ε),
    normalised to sum 1, then `iterations` times prototypes to 1/K and samples to 1/B; rows of the
    result sum to 1. In the log domain (the same numbers, no overflow for scores far from [-1, 1]).
    gather_fn: with several processes, the iterations run over every process's rows (the official
    all_reduce) and the local rows are returned.
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
    loss, h, h_mean = 0.0, 0.0, 0.0
    for a, i in enumerate(assign):
        s = scores[i]
        if queue_scores is not None:
            s = torch.cat([queue_scores[a], s])
        q = sinkhorn(s, epsilon, iterations, gather_fn)[-N:]  # (N, K), this batch's rows
        cross = -(log_p * q).sum(dim=-1).mean(dim=-1)  # (V,) batch-mean CE of every crop against q
        loss = loss + (cross.sum() - cross[i]) / (V - 1)  # every other crop; no boolean indexing
        h = h + _dist_entropy(q).mean()
        h_mean = h_mean + _dist_entropy(q.mean(dim=0))
    A = len(assign)
    return LossOut(loss / A, {"q_entropy": (h / A).detach(), "q_mean_entropy": (h_mean / A).detach()})


@_fp32
def cluster_prediction_loss(pred: Tensor, codewords: Tensor, labels: Tensor, temperature: float = 0.1,
                            select: Tensor | None = None) -> LossOut:
    """HuBERT: predict each frame's cluster id from cosine similarities to learned codeword embeddings.

    Hsu et al. 2021, "HuBERT: Self-Supervised Speech Representation Learning by Masked Prediction
    of Hidden Units", eq. 1-3; fairseq `models/hubert/hubert.py` `compute_nce` / `compute_logits`
    and `criterions/hubert_criterion.py`. logits_c = cos(pred, e_c) / temperature for every
    codeword c; cross-entropy against the frame's label, summed over the rows (the criterion divides
    by the frame count; the caller does). fairseq puts the positive first and gives -inf to the
    "negatives" equal to it, which is this same softmax over all codewords.

    pred (N, D) projected frames, codewords (C, D), labels (N,) long in [0, C).
    select (N,) bool: only those rows count (as indexing pred and labels with it, without its
    data-dependent shape, a host sync on a GPU).
    Returns the summed loss; terms: correct (rows whose label has the highest logit; fairseq
    compute_correct, whose argmax-and-argmin case only arises with all logits equal), rows."""
    # one (N, D) x (D, C) product of unit vectors, not an (N, C, D) broadcast
    logits = F.normalize(pred.float(), dim=-1) @ F.normalize(codewords.float(), dim=-1).t() / temperature
    if select is None:
        loss = F.cross_entropy(logits, labels, reduction="sum")
        rows = torch.full((), float(labels.numel()), device=loss.device)
    else:
        w = select.reshape(-1).to(logits.dtype)
        loss = (F.cross_entropy(logits, labels, reduction="none") * w).sum()
        rows = w.sum()
    with torch.no_grad():
        top, bottom = logits.argmax(-1) == labels, logits.argmin(-1) == labels
        hit = top & ~bottom
        correct = (hit if select is None else hit & select.reshape(-1)).sum().float()
    return LossOut(loss, {"correct": correct, "rows": rows})
