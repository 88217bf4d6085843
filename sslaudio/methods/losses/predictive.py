"""Predictive reconstruction losses on input features: APC and masked acoustic models (MPC, TERA)."""

from __future__ import annotations

from torch import Tensor

from sslaudio.methods.losses._common import _fp32


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
def masked_reconstruction_loss(pred: Tensor, target: Tensor, mask: Tensor, kind: str = "l1") -> Tensor:
    """Masked acoustic model loss: mean |pred - target| ("l1") or (pred - target)^2 ("mse") over
    the elements where the bool `mask` (same shape) is True; 0 when none is. Mockingjay / TERA,
    s3prl `TransformerForMaskedAcousticModel` (L1 over `masked_select`); TERA's frequency band
    counts bin by bin. Target detached."""
    if pred.shape != target.shape or mask.shape != pred.shape:
        raise ValueError(f"masked_reconstruction_loss: expected pred, target and mask of one shape, "
                         f"found {tuple(pred.shape)}, {tuple(target.shape)} and {tuple(mask.shape)}")
    if kind not in ("l1", "mse"):
        raise ValueError(f"masked_reconstruction_loss: kind={kind!r}; use 'l1' or 'mse'")
    diff = pred.float() - target.detach().float()
    per_elem = diff.abs() if kind == "l1" else diff.pow(2)
    m = mask.to(per_elem.dtype)
    return (per_elem * m).sum() / m.sum().clamp_min(1.0)
