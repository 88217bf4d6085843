"""Regression losses: BYOL / SimSiam cosine losses and the data2vec targets and regression loss."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sslaudio.methods.losses._common import _check_2d_pair, _fp32

_IN_EPS = 1e-5  # F.instance_norm's default eps, which data2vec uses


@_fp32
def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's 2 - 2 cos(p, sg(z)) for (N, D) inputs, mean over the batch (Grill et al. 2020, eq. 2;
    deepmind-research/byol `regression_loss`). One direction: callers sum both."""
    _check_2d_pair("byol_loss", p, z)
    p, z = p.float(), z.detach().float()
    cos = (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1)  # (N,)
    return (2.0 - 2.0 * cos).mean()


@_fp32
def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = -cos(p, sg(z)) for (N, D) inputs, mean over the batch (Chen & He 2021,
    eq. 1-3; facebookresearch/simsiam). One direction: callers average both."""
    _check_2d_pair("negative_cosine", p, z)
    p, z = p.float(), z.detach().float()
    return -(F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1).mean()


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
def regression_loss(pred: Tensor, target: Tensor, beta: float = 0.0, select: Tensor | None = None) -> Tensor:
    """data2vec regression: per token Σ_d loss(pred_d, target_d) / sqrt(D), mean over tokens.

    Baevski et al. 2022, "data2vec", eq. 2; fairseq examples/data2vec/models/data2vec_audio.py:
    beta == 0 -> squared error (the released audio configs use loss_beta 0), else smooth-L1 with
    that beta; summed over D, scaled by 1 / sqrt(D) (`loss_scale` unset), summed over tokens and
    divided by the token count (the criterion's sample_size). The caller selects the tokens
    (data2vec: the masked ones). No tokens gives a loss of 0.

    pred: (..., D) student predictions. target: (..., D) teacher targets, detached.
    select: (...) bool, the tokens that count (the same as indexing both with it, without the
      data-dependent shape, a host sync on a GPU).
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
    if select is not None:
        w = select.to(per_token.dtype)
        return (per_token * w).sum() / w.sum().clamp_min(1)
    return per_token.sum() / max(per_token.numel(), 1)
