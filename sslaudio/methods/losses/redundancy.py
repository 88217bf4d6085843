"""Redundancy-reduction losses: Barlow Twins and VICReg."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslaudio.methods.losses._common import (
    LossOut,
    _check_2d_pair,
    _fp32,
    _off_diagonal,
)

_BN_EPS = 1e-5  # nn.BatchNorm1d's default eps, which Barlow Twins' `self.bn` uses


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
